"""The command line: `kernl-compile` and the `kernl` group (compile, verify, ...)."""

from __future__ import annotations

import sys
import time

import click

from kernl.artifacts import ArtifactError

BUCKETS_HELP = (
    'Shapes to compile for, e.g. "batch=1,8,32 seq=16:512". Each axis takes a comma list '
    "of sizes or power-of-two ranges (16:512 = 16,32,...,512); the buckets are every "
    "(batch, seq) pair. A call is served by the smallest bucket that holds it."
)


def _compile_options(f):
    options = [
        click.argument("model"),
        click.option("-o", "--out", required=True, type=click.Path(), help="Artifact folder to write (replaced atomically if it is a kernl artifact)."),
        click.option("--buckets", required=True, help=BUCKETS_HELP),
        click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True, help="Precision of weights and compute."),
        click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="Where to trace, tune and validate; the artifact serves there. Default: cuda if present, else cpu."),
        click.option("--task", type=click.Choice(["base", "sequence-classification", "token-classification", "masked-lm"]), default=None, help="Model head. Default: from the config's architectures."),
        click.option("--atol", type=float, default=None, help="Absolute tolerance of validation against eager (default per dtype: fp32 1e-4, fp16 2e-2, bf16 8e-2)."),
        click.option("--rtol", type=float, default=None, help="Relative tolerance of validation against eager (default per dtype: fp32 1e-4, fp16 2e-2, bf16 5e-2)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _run_compile(model, out, buckets, dtype, device, task, atol, rtol) -> None:
    from kernl.compiler.api import compile as compile_model
    from kernl.compiler.buckets import BucketSyntaxError

    start = time.perf_counter()

    def progress(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    try:
        report = compile_model(
            model, buckets, out, dtype=dtype, device=device, task=task, atol=atol, rtol=rtol,
            progress=progress,
        )  # fmt: skip
    except BucketSyntaxError as e:
        raise click.BadParameter(str(e), param_hint="--buckets") from None
    except (ArtifactError, ValueError, RuntimeError, OSError) as e:
        click.echo(f"kernl-compile: error: {e}", err=True)
        sys.exit(1)
    click.echo(report.table())


@click.command(
    "kernl-compile",
    help="Compile a Hugging Face model (a local folder with config.json and safetensors, or a "
    "model id already in the local HF cache) into a kernl artifact for a set of shape buckets.\n\n"
    'Example: kernl-compile ./my-bert -o bert.kernl --buckets "batch=1,8 seq=16:512"',
)
@_compile_options
def compile_command(**kwargs) -> None:
    _run_compile(**kwargs)


@click.group(help="kernl: ahead-of-time compiled transformers. See each command's --help.")
@click.version_option(package_name="kernl")
def main() -> None:
    pass


@main.command("compile", help=compile_command.help)
@_compile_options
def compile_subcommand(**kwargs) -> None:
    _run_compile(**kwargs)


@main.command(
    "verify",
    help="Check an artifact without loading it onto a GPU: format "
    "version, paths, file hashes, programs, op vocabulary and weights header.",
)
@click.argument("path", type=click.Path())
def verify_command(path: str) -> None:
    from kernl.artifacts import read_program, verify_artifact
    from kernl.runtime.vocabulary import is_known_op

    try:
        manifest = verify_artifact(path)
        for entry in manifest.buckets:
            unknown = sorted(
                op for op in read_program(path, entry.program).ops_used() if not is_known_op(op)
            )
            if unknown:
                raise ArtifactError(f"{entry.program}: ops outside the vocabulary: {unknown}")
    except ArtifactError as e:
        click.echo(f"INVALID {path}: {e}", err=True)
        sys.exit(1)
    click.echo(
        f"OK {path}: format v{manifest.format_version}, {manifest.model_type} "
        f"({manifest.task}, {manifest.dtype}), {len(manifest.buckets)} buckets, "
        f"{len(manifest.files)} files verified"
    )
