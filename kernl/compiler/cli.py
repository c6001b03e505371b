"""The command line: `kernl-compile` and the `kernl` group (compile, verify, inspect, bench,
serve). Thin: the work lives in api.py, inspect_report.py, bench.py and kernl.serving."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from kernl.artifacts import ArtifactError
from kernl.artifacts.schema import MANIFEST_FILE

from .plural import count

BUCKETS_HELP = (
    'Shapes to compile for, e.g. "batch=1,8,32 seq=16:512". Each axis takes a comma list '
    "of sizes or power-of-two ranges (16:512 = 16,32,...,512); the buckets are every "
    '(batch, seq) pair. Or list the buckets as BATCHxSEQ: "1x16,8x128" (the form kernl '
    "bench and kernl inspect print). A call is served by the smallest bucket that holds it. "
    "A bucket longer than the model's max_position_embeddings is refused. For --task "
    'causal-lm: "batch=1,4,8 prompt=16:1024 cache=2048" (prefill buckets per batch x prompt '
    "length; cache is the KV-cache length, or several lengths for decode buckets, e.g. "
    "cache=512,2048; default twice the largest prompt). For --task seq2seq-lm: "
    '"batch=1,8 source=32:512 cache=128"; for --task speech-seq2seq (Whisper): '
    '"batch=1,8 cache=448" (the source is one 30 s window).'
)


def _tolerance(ctx, param, value):
    # FloatRange(min=0) lets NaN through (NaN < 0 is False), and a NaN tolerance turns
    # validation off: no error compares greater than it.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _bench_device(ctx, param, value):
    if value is None:
        return value
    from .bench import DeviceOptionError, parse_device

    try:
        parse_device(value)
    except DeviceOptionError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _compile_options(f):
    options = [
        click.argument("model"),
        click.option(
            "-o",
            "--out",
            required=True,
            type=click.Path(),
            help="Artifact folder to write (replaced atomically if it is a kernl artifact).",
        ),
        click.option("--buckets", required=True, help=BUCKETS_HELP),
        click.option(
            "--dtype",
            type=click.Choice(["fp16", "bf16", "fp32"]),
            default="fp16",
            show_default=True,
            help="Precision of weights and compute. bf16 on the CPU needs --no-kernels: Triton's interpreter computes bf16 wrongly.",
        ),
        click.option(
            "--device",
            type=click.Choice(["cuda", "cpu"]),
            default=None,
            help="Where to trace, tune and validate; the artifact serves there. Default: cuda if present, else cpu.",
        ),
        click.option(
            "--task",
            type=click.Choice(
                [
                    "base",
                    "sequence-classification",
                    "token-classification",
                    "masked-lm",
                    "question-answering",
                    "causal-lm",
                    "seq2seq-lm",
                    "speech-seq2seq",
                ]
            ),
            default=None,
            help='Model head. Default: from the config\'s architectures (…ForSequenceClassification, …ForTokenClassification, …ForMaskedLM, …ForQuestionAnswering; …ForCausalLM and …LMHeadModel are causal-lm; …Model is base; another head, such as …ForPreTraining, is refused: give --task base to compile its encoder alone; a config naming no architecture is base, refused where the checkpoint holds weights the encoder leaves unused, a head). causal-lm: decoder-only text generation (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma2, Gemma3 text, GPT-2); its buckets use the axes batch, prompt, cache. seq2seq-lm (…ForConditionalGeneration, MarianMTModel): T5 v1.0/v1.1, mT5, BART, mBART (the forced target-language BOS of mBART-50 and forced EOS applied as HF does) and Marian (opus-mt), greedy or sampled generation (no beam search); its axes are batch, source, cache, e.g. T5 "batch=1,8 source=32:512 cache=128", BART "batch=1,8 source=32:1024 cache=128", mBART "batch=1,8 source=32:1024 cache=200", Marian "batch=1,8 source=16:512 cache=256" (source and cache within max_position_embeddings). speech-seq2seq (WhisperForConditionalGeneration): Whisper transcription of one 30 s window (3000 mel frames, 1500 encoder positions, so no source axis), greedy or sampled, no beam search, no timestamps; its axes are batch and cache (decoder prompt + new tokens, at most max_target_positions), e.g. "batch=1,8 cache=448".',
        ),
        click.option(
            "--atol",
            type=click.FloatRange(min=0),
            callback=_tolerance,
            default=None,
            help="Absolute tolerance of validation against eager (default per dtype: fp32 1e-4, fp16 2e-2, bf16 8e-2). Encoder tasks and causal-lm only: seq2seq-lm and speech-seq2seq validation compares greedy ids, so it is refused there.",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0),
            callback=_tolerance,
            default=None,
            help="Relative tolerance of validation against eager (default per dtype: fp32 1e-4, fp16 2e-2, bf16 5e-2). Encoder tasks and causal-lm only: seq2seq-lm and speech-seq2seq validation compares greedy ids, so it is refused there.",
        ),
        click.option(
            "--kernels/--no-kernels",
            default=True,
            show_default=True,
            help="Rewrite onto kernl's fused Triton kernels; --no-kernels keeps plain aten ops (still one CUDA graph per bucket). With --task causal-lm, seq2seq-lm or speech-seq2seq: let the decode step use kernl's kernels where timing shows they are faster (fp16/bf16 on a GPU; the compile summary gives each candidate's step time); --no-kernels keeps plain torch.",
        ),
        click.option(
            "--tune/--no-tune",
            default=True,
            show_default=True,
            help="Encoder tasks: on a GPU, time every kernel instance over its tuning space and against aten (results cached in ~/.cache/kernl/tuning, or $KERNL_CACHE_DIR/tuning; each instance's candidates compile on up to 8 threads before they are timed, KERNL_COMPILE_THREADS=N sets N, 0 turns it off); --no-tune takes each kernel's default config. causal-lm, seq2seq-lm and speech-seq2seq: on a GPU the decode step is timed on torch and on kernl's kernels; --no-tune skips that and keeps the plain torch step.",
        ),
        click.option(
            "--sign",
            "sign_key",
            type=click.Path(dir_okay=False),
            default=None,
            help="Sign the artifact's manifest with this Ed25519 private key (PEM, e.g. from `kernl keygen`); deployments that pin the public key (load(trusted_keys=...), KERNL_TRUSTED_KEYS, kernl verify --trusted-key) then refuse anything else. Needs kernl[sign].",
        ),
        click.option(
            "--verbose",
            is_flag=True,
            help="Show the compiler output of tuning candidates that fail to compile (Triton's MLIR dumps); without it they are skipped, counted in the summary and their first line listed (same as KERNL_VERBOSE=1). Also shows the traceback of a failure kernl did not foresee.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_compile(
    prog: str,  # the command as typed, "kernl-compile" or "kernl compile", for its error lines
    model,
    out,
    buckets,
    dtype,
    device,
    task,
    atol,
    rtol,
    kernels=True,
    tune=True,
    sign_key=None,
    verbose=False,
) -> None:
    # The progress lines and the summary's total count from when the user started the command:
    # imports (torch, transformers) and task detection are seconds of it.
    start = _command_start if _command_start is not None else time.perf_counter()
    if importlib.util.find_spec("transformers") is None:
        # click alone comes with Ray Serve (kernl[serve]); the compile loads models through
        # transformers, which only the compile extra brings
        click.echo(f"{prog} needs the compile extra: pip install 'kernl[compile]'", err=True)
        sys.exit(2)
    from kernl.compiler.api import OptionNotApplicableError
    from kernl.compiler.api import compile as compile_model
    from kernl.compiler.buckets import BucketSyntaxError
    from kernl.compiler.validate import ValidationError

    if verbose:
        os.environ["KERNL_VERBOSE"] = "1"  # read by the tuner (compiler/tune.py, TuneSession)

    def progress(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    before = _artifact_identity(out)
    try:
        with _terminate_as_interrupt(), _said_if_written(out, before):
            report = compile_model(
                model,
                buckets,
                out,
                dtype=dtype,
                device=device,
                task=task,
                atol=atol,
                rtol=rtol,
                kernels=kernels,
                tune=tune,
                sign_key=sign_key,
                progress=progress,
            )
    except BucketSyntaxError as e:
        raise click.BadParameter(str(e), param_hint="--buckets") from None
    except OptionNotApplicableError as e:  # known once the task is (from the config)
        raise click.BadParameter(str(e), param_hint=f"--{e.option}") from None
    except ValidationError as e:  # an AssertionError: not caught by the line below
        click.echo(
            f"{prog}: error: validation against eager failed: {e}\n"
            "No artifact was written. Loosen --atol/--rtol if the error is acceptable, or keep "
            "plain aten ops with --no-kernels.",
            err=True,
        )
        sys.exit(1)
    except (ArtifactError, ValueError, RuntimeError, OSError) as e:
        click.echo(f"{prog}: error: {e}{_notes(e)}", err=True)
        sys.exit(1)
    except Exception as e:  # not foreseen: one line for the user, the traceback on --verbose
        if verbose:
            raise
        click.echo(
            f"{prog}: error: {type(e).__name__}: {e}{_notes(e)}\n"
            "No artifact was written. This failure was not foreseen by kernl: rerun with "
            "--verbose for the traceback, and please report it.",
            err=True,
        )
        sys.exit(1)
    report.seconds = time.perf_counter() - start  # compile() times itself alone
    click.echo(report.table())


class _Terminated(BaseException):
    """SIGTERM (`docker stop`, a job runner's cancel) during a compile, raised in the main
    thread as Ctrl-C is, so that the artifact writer removes its partial folder (the default
    action ended the process at once and left a hidden `.partial-*` folder behind)."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises _Terminated for the compile's duration, where this process is the
    command's own (not a caller's main(args=...) or CliRunner), in its main thread, and no
    one set another handler for it."""
    if (
        _command_start is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is terminated:  # not one set meanwhile
            signal.signal(signal.SIGTERM, previous)


def _artifact_identity(out: str | os.PathLike) -> tuple[int, int] | None:
    """The artifact folder at `out` as a file (device, inode), None where there is none: a
    commit puts a new folder there."""
    try:
        os.stat(os.path.join(out, MANIFEST_FILE))
        info = os.stat(out)
    except OSError:
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def _said_if_written(out: str | os.PathLike, before: tuple[int, int] | None) -> Iterator[None]:
    """Ctrl-C or SIGTERM that comes after the new artifact was committed (while the replaced
    one is deleted) ends the command as interrupted, saying that `out` holds the new artifact:
    "Interrupted." alone read as if the previous artifact were still there."""
    try:
        yield
    except (KeyboardInterrupt, _Terminated) as e:
        now = _artifact_identity(out)
        if now is None or now == before:
            raise
        what, code = (
            ("Interrupted", 130) if isinstance(e, KeyboardInterrupt) else ("Terminated", 143)
        )
        click.echo(
            f"\n{what} after {out} was written: it holds the new artifact, compiled and "
            "validated (any previous one there was replaced).",
            err=True,
        )
        sys.exit(code)  # SystemExit: not one of the compile's errors the caller reports


def _notes(error: BaseException) -> str:
    """What the compile added to an error on its way out (the bucket it came from)."""
    notes = getattr(error, "__notes__", None)
    return f" ({'; '.join(notes)})" if notes else ""


# perf_counter() at this process's start where a command runs as the process's own (main()
# reading sys.argv: an entry point, not a caller's CliRunner or main(args=[...])).
_command_start: float | None = None


def _process_start() -> float:
    """perf_counter() at this process's start, from Linux's /proc; now where unknown."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name before ")" may hold spaces
        ticks = int(fields[19])  # field 22: the start, in clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    # Older than any import takes: a long-lived process (a notebook) calling main() itself.
    return now - age if 0.0 <= age < 60.0 else now


class _TimedFromProcessStart:
    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        global _command_start
        if args is None:
            _command_start = _process_start()
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        # Ctrl-C ends with 130 (128 + SIGINT), as shells and job runners expect of an interrupted
        # command; click's own "Aborted!" exits 1, which reads as a failed compile. Whatever was
        # being written is gone already: the artifact writer removes its partial folder on any
        # exception.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            raise click.exceptions.Exit(130) from None
        except _Terminated:  # SIGTERM, 128 + 15 as for a process the signal ended
            click.echo("\nTerminated.", err=True)
            raise click.exceptions.Exit(143) from None


class _Command(_TimedFromProcessStart, click.Command):
    pass


class _Group(_TimedFromProcessStart, click.Group):
    pass


@click.command(
    "kernl-compile",
    cls=_Command,
    help="Compile a Hugging Face model (a local folder with config.json and safetensors, or a "
    "model id already in the local HF cache) into a kernl artifact for a set of shape buckets.\n\n"
    'Example: kernl-compile ./my-bert -o bert.kernl --buckets "batch=1,8 seq=16:512"',
)
@_compile_options
def compile_command(**kwargs) -> None:
    _run_compile("kernl-compile", **kwargs)


@click.group(
    cls=_Group, help="kernl: ahead-of-time compiled transformers. See each command's --help."
)
@click.version_option(package_name="kernl")
def main() -> None:
    pass


@main.command("compile", help=compile_command.help)
@_compile_options
def compile_subcommand(**kwargs) -> None:
    _run_compile("kernl compile", **kwargs)


@main.command(
    "verify",
    help="Check an artifact without loading it onto a GPU: format "
    "version, paths, file hashes, programs, op vocabulary, weights header, and the torch "
    "major version it was built with against this one (the GPU architecture and Triton "
    "version are load()'s to check, on the GPU).",
)
@click.argument("path", type=click.Path())
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="An Ed25519 public key (PEM) the artifact must be signed by (repeatable; default: the "
    "files in $KERNL_TRUSTED_KEYS, as load() does). Needs kernl[sign].",
)
def verify_command(path: str, trusted_keys: tuple[str, ...]) -> None:
    from kernl.artifacts import ArtifactCompatibilityError, verify_artifact
    from kernl.artifacts.compat import check_torch_version
    from kernl.artifacts.signing import (
        KeyFileError,
        SigningUnavailableError,
        trusted_keys_from_env,
    )

    try:
        # the checks load() makes, signature included, and its rules that need no GPU
        manifest = verify_artifact(path, trusted_keys=list(trusted_keys) or trusted_keys_from_env())
        check_torch_version(manifest)
    except ArtifactCompatibilityError as e:
        click.echo(
            f"INCOMPATIBLE {path}: its files are sound, but load() refuses it here: {e}", err=True
        )
        sys.exit(1)
    except ArtifactError as e:
        click.echo(f"INVALID {path}: {e}", err=True)
        sys.exit(1)
    except (KeyFileError, SigningUnavailableError) as e:
        click.echo(f"kernl verify: error: {e}", err=True)
        sys.exit(1)
    click.echo(
        f"OK {path}: format v{manifest.format_version}, {manifest.model_type} "
        f"({manifest.task}, {manifest.dtype}), {count(len(manifest.buckets), 'bucket')}, "
        f"{count(len(manifest.files), 'file')} verified"
    )


@main.command(
    "keygen",
    help="Write a new Ed25519 key pair for signing artifacts: PRIVATE (PEM, mode 0600; give "
    "it to kernl-compile --sign) and PRIVATE.pub (pin it where artifacts are loaded). Needs "
    "kernl[sign].",
)
@click.argument("private", type=click.Path(dir_okay=False))
def keygen_command(private: str) -> None:
    from kernl.artifacts.signing import SigningUnavailableError, generate_keypair

    try:
        kid = generate_keypair(private, f"{private}.pub")
    except (SigningUnavailableError, OSError) as e:
        click.echo(f"kernl keygen: error: {e}", err=True)
        sys.exit(1)
    click.echo(f"key {kid}: private {private}, public {private}.pub")


@main.command(
    "inspect",
    help="Show what an artifact holds: model, task, dtype, the GPU and versions it was built "
    "for, buckets with their validation error, kernels and their chosen configs (or the op "
    "counts of each program), file sizes. Reads no weights and needs no GPU. It checks no "
    "hashes or signature: the report shows what the files say, not that they are intact or "
    "loadable; `kernl verify` checks that.",
)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_command(path: str, as_json: bool) -> None:
    import json

    from .inspect_report import inspect_artifact, render_text

    try:
        report = inspect_artifact(path)
    except ArtifactError as e:
        click.echo(f"kernl inspect: error: {e}", err=True)
        sys.exit(1)
    # default=repr: a manifest value JSON has no type for (bytes) is shown, not a crash.
    text = json.dumps(report.to_json(), indent=2, default=repr) if as_json else render_text(report)
    click.echo(text)


@main.command(
    "bench",
    help="Measure an encoder artifact (base, sequence-classification, token-classification, "
    "masked-lm, question-answering) against the model it was compiled from, on the same inputs: "
    "latency (median, p90) and sequences/s per shape for kernl and each peer, each peer's "
    "warm-up/compile time and kernl's cold start in a fresh process. Peers: eager (the "
    "Hugging Face model in the artifact's dtype), compile (torch.compile "
    'mode="reduce-overhead"), max-autotune (torch.compile mode="max-autotune"; minutes per '
    "shape). Timed with CUDA events on a GPU, perf_counter on the CPU. causal-lm, seq2seq-lm "
    "and speech-seq2seq artifacts are refused: bench does not time generate().\n\n"
    "Example: kernl bench bert.kernl --against eager,compile --plot bench.png",
)
@click.argument("path", type=click.Path())
@click.option(
    "--against",
    default="eager",
    show_default=True,
    help="Comma list of peers: eager, compile, max-autotune (or none).",
)
@click.option(
    "--model",
    default=None,
    help="The original model folder (default: the manifest's model_source).",
)
@click.option(
    "--buckets",
    "shapes",
    default=None,
    help='Shapes to time: "1x16,8x128" or "batch=1,8 seq=16,128". Default: the artifact\'s buckets. A shape between buckets is served by the next bucket up.',
)
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Timed calls per shape and implementation.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Untimed calls after the first 3 (which are timed as the warm-up).",
)
@click.option(
    "--device",
    default=None,
    callback=_bench_device,
    help="cuda, cuda:N or cpu (default: what the artifact was built for).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw latency per shape for every implementation into this image (needs matplotlib).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Save the raw figures (every timing) as JSON here.",
)
@click.option(
    "--cold-start/--no-cold-start",
    default=True,
    show_default=True,
    help="Time import + load + first call of the artifact in a fresh process.",
)
def bench_command(
    path, against, model, shapes, iters, warmup, device, plot, json_path, cold_start
) -> None:
    import importlib.util
    import json

    from .bench import Bench, BenchConfig, BenchError, PeerSyntaxError, parse_against, parse_shapes
    from .buckets import BucketSyntaxError

    if plot and importlib.util.find_spec("matplotlib") is None:
        # Checked before minutes of measuring, not after.
        raise click.UsageError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        )
    if plot:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(plot).suffix.lower().lstrip(".") not in kinds:  # matplotlib reads the format
            raise click.BadParameter(  # from it (without one it wrote bench.png for bench)
                f"{plot!r} names no image format matplotlib writes: end it in one of "
                f".{', .'.join(sorted(kinds))} (e.g. bench.png)",
                param_hint="--plot",
            )
    for option, target in (("--plot", plot), ("--json", json_path)):
        _check_output_folder(option, target)  # before minutes of measuring, not after
    try:
        config = BenchConfig(
            Path(path),
            against=parse_against(against),
            model=model,
            shapes=parse_shapes(shapes) if shapes else None,
            iters=iters,
            warmup=warmup,
            device=device,
            cold_start=cold_start,
        )
        bench = Bench(config)
        bench.check_model()
        note = bench.relative_source_note()
        if note:
            click.echo(f"kernl bench: note: {note}", err=True)
    except BucketSyntaxError as e:
        raise click.BadParameter(str(e), param_hint="--buckets") from None
    except PeerSyntaxError as e:
        raise click.BadParameter(str(e), param_hint="--against") from None
    except (BenchError, ArtifactError, RuntimeError) as e:
        click.echo(f"kernl bench: error: {e}", err=True)
        sys.exit(1)

    def save_json() -> None:
        # Rewritten after every step: a run cut short keeps what it measured.
        if json_path:
            tmp = Path(f"{json_path}.tmp")
            tmp.write_text(json.dumps(bench.result.to_json(), indent=1))
            os.replace(tmp, json_path)

    try:
        _run_steps(bench, save_json)
    except (BenchError, ArtifactError, RuntimeError, OSError) as e:
        click.echo(f"kernl bench: error: {e}", err=True)
        sys.exit(1)
    result = bench.result
    click.echo(result.table())
    if json_path:
        click.echo(f"raw figures: {json_path}")
    if plot:
        from .bench import plot as draw

        try:
            draw(result, plot)
        except (OSError, ValueError, RuntimeError) as e:  # the table above stands
            click.echo(f"kernl bench: error: the plot was not written: {e}", err=True)
            sys.exit(1)
        click.echo(f"plot: {plot}")


def _check_output_folder(option: str, target: str | None) -> None:
    if not target:
        return
    folder = Path(target).parent
    if not folder.is_dir():
        raise click.BadParameter(f"folder {str(folder)!r} does not exist", param_hint=option)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"folder {str(folder)!r} is not writable", param_hint=option)


def _run_steps(bench, after_step) -> None:
    """A progress bar on a terminal; one line per step otherwise (logs, CI)."""
    steps = bench.steps()
    if sys.stderr.isatty():
        with click.progressbar(
            steps,
            label="kernl bench",
            file=sys.stderr,
            show_pos=True,
            item_show_func=lambda s: s.label if s else "",
        ) as bar:
            for step in bar:
                bench.run(step)
                after_step()
        return
    start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        click.echo(
            f"[{time.perf_counter() - start:6.1f}s] [{i}/{len(steps)}] {step.label}", err=True
        )
        t = bench.run(step)
        after_step()
        if t is not None:
            click.echo(
                f"[{time.perf_counter() - start:6.1f}s] [{i}/{len(steps)}] {step.label}: "
                f"median {t.median_ms:.3f} ms, p90 {t.p90_ms:.3f} ms, "
                f"warm-up {t.warmup_s:.2f} s",
                err=True,
            )


@main.command(
    "serve",
    help="Serve an artifact over HTTP (kernl.serving; needs the `serve` extra). Every "
    "argument is passed on: `kernl serve --help` shows them.",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def serve_command(ctx: click.Context) -> None:
    try:
        from kernl.serving.cli import serve_main
    except ImportError as e:
        click.echo(
            f"kernl serve: error: kernl.serving is not available ({e}); install the serve "
            "extra: pip install 'kernl[serve]'",
            err=True,
        )
        sys.exit(1)
    sys.exit(serve_main(list(ctx.args)))


if __name__ == "__main__":
    main()
