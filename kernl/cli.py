"""The `kernl` command. With the compile extra (click, transformers) it is the full command
set of kernl/compiler/cli.py; in the runtime-only install (`pip install kernl`) it still
verifies artifacts, and names the extra for every other command instead of crashing."""

from __future__ import annotations

import argparse
import sys

EXTRA_HINT = "pip install 'kernl[compile]'"


def main(argv: list[str] | None = None) -> None:
    try:
        import click  # noqa: F401
    except ImportError:
        sys.exit(_runtime_only(sys.argv[1:] if argv is None else argv))
    from kernl.compiler.cli import main as full

    full(args=argv)


def _runtime_only(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kernl",
        description=f"kernl, runtime-only install: `kernl verify` works here, and `kernl serve` "
        f"with the serve extra; inspect, bench and keygen need the compile extra ({EXTRA_HINT}).",
    )
    commands = parser.add_subparsers(dest="command")
    verify = commands.add_parser("verify", help="check an artifact as load() does")
    verify.add_argument("path")
    verify.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        action="append",
        default=[],
        help="an Ed25519 public key (PEM) the artifact must be signed by",
    )
    known = {"verify", "inspect", "bench", "serve", "keygen", "compile"}
    if argv and argv[0] == "serve":  # argparse, not click: it needs the serve extra only
        from kernl.serving.cli import serve_main

        return serve_main(argv[1:])
    if argv and argv[0] in known - {"verify"}:
        print(f"kernl {argv[0]} needs the compile extra: {EXTRA_HINT}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command != "verify":
        parser.print_help()
        return 2
    from kernl.artifacts import ArtifactError, verify_artifact
    from kernl.artifacts.signing import (
        KeyFileError,
        SigningUnavailableError,
        trusted_keys_from_env,
    )

    try:
        manifest = verify_artifact(
            args.path, trusted_keys=args.trusted_keys or trusted_keys_from_env()
        )
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
