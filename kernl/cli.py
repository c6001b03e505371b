"""The `kernl` and `kernl-compile` commands. With the compile extra (click, transformers) they
are the full commands of kernl/compiler/cli.py; in the runtime-only install (`pip install
kernl`) `kernl` still verifies artifacts (and writes signing keys where the sign extra is
installed), and both name the extra for every other command instead of crashing."""

from __future__ import annotations

import argparse
import sys

EXTRA_HINT = "pip install 'kernl[compile]'"


def main(argv: list[str] | None = None) -> None:
    try:
        import click  # noqa: F401
    except ImportError:
        try:
            code = _runtime_only(sys.argv[1:] if argv is None else argv)
        except KeyboardInterrupt:  # as the full command says it (hashing GBs takes seconds)
            print("\nInterrupted.", file=sys.stderr)
            code = 130
        sys.exit(code)
    try:  # torch and transformers take seconds to import: Ctrl-C then is no traceback
        from kernl.compiler.cli import main as full
    except KeyboardInterrupt:
        _interrupted()
    full(args=argv)


def compile_main() -> None:
    """`kernl-compile`: pip installs it with the runtime too, where click is missing."""
    try:
        import click  # noqa: F401
    except ImportError:
        print(f"kernl-compile needs the compile extra: {EXTRA_HINT}", file=sys.stderr)
        sys.exit(2)
    try:
        from kernl.compiler.cli import compile_command
    except KeyboardInterrupt:
        _interrupted()
    compile_command()


def _interrupted() -> None:
    print("\nInterrupted.", file=sys.stderr)
    sys.exit(130)


def _runtime_only(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kernl",
        description=f"kernl, runtime-only install: `kernl verify` works here, `kernl keygen` "
        f"with the sign extra and `kernl serve` with the serve extra; compile, inspect and bench "
        f"need the compile extra ({EXTRA_HINT}).",
    )
    from kernl._version import __version__

    parser.add_argument("--version", action="version", version=f"kernl, version {__version__}")
    commands = parser.add_subparsers(dest="command")
    verify = commands.add_parser(
        "verify",
        help="check an artifact as load() does, short of the GPU architecture and Triton version",
    )
    verify.add_argument("path")
    verify.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        action="append",
        default=[],
        help="an Ed25519 public key (PEM) the artifact must be signed by",
    )
    keygen = commands.add_parser(
        "keygen",
        help="write a new Ed25519 key pair: PRIVATE (PEM, mode 0600) and PRIVATE.pub "
        "(needs kernl[sign])",
    )
    keygen.add_argument("private")
    # dispatched before parsing (argparse, not click: it needs the serve extra only); listed
    # here so that --help names it
    commands.add_parser("serve", help="serve an artifact over HTTP (needs kernl[serve])")
    known = {"verify", "inspect", "bench", "serve", "keygen", "compile"}
    if argv and argv[0] == "serve":  # argparse, not click: it needs the serve extra only
        from kernl.serving.cli import serve_main

        return serve_main(argv[1:])
    if argv and argv[0] in known - {"verify", "keygen"}:
        print(f"kernl {argv[0]} needs the compile extra: {EXTRA_HINT}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return _keygen(args.private)
    if args.command != "verify":
        parser.print_help()
        return 2
    from kernl.artifacts import ArtifactCompatibilityError, ArtifactError, verify_artifact
    from kernl.artifacts.compat import check_torch_version
    from kernl.artifacts.signing import (
        KeyFileError,
        SigningUnavailableError,
        trusted_keys_from_env,
    )

    try:
        manifest = verify_artifact(
            args.path, trusted_keys=args.trusted_keys or trusted_keys_from_env()
        )
        check_torch_version(manifest)  # load()'s rules that need no GPU, as `kernl verify`'s
    except ArtifactCompatibilityError as e:
        print(
            f"INCOMPATIBLE {args.path}: its files are sound, but load() refuses it here: {e}",
            file=sys.stderr,
        )
        return 1
    except ArtifactError as e:
        print(f"INVALID {args.path}: {e}", file=sys.stderr)
        return 1
    except (KeyFileError, SigningUnavailableError) as e:
        print(f"kernl verify: error: {e}", file=sys.stderr)
        return 1
    buckets, files = len(manifest.buckets), len(manifest.files)
    print(
        f"OK {args.path}: format v{manifest.format_version}, {manifest.model_type} "
        f"({manifest.task}, {manifest.dtype}), {buckets} bucket{'s' * (buckets != 1)}, "
        f"{files} file{'s' * (files != 1)} verified"
    )
    return 0


def _keygen(private: str) -> int:
    from kernl.artifacts.signing import SigningUnavailableError, generate_keypair

    try:
        kid = generate_keypair(private, f"{private}.pub")
    except (SigningUnavailableError, OSError) as e:
        print(f"kernl keygen: error: {e}", file=sys.stderr)
        return 1
    print(f"key {kid}: private {private}, public {private}.pub")
    return 0
