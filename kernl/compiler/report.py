"""What a compile reports: per bucket time, error against eager and counts, and the tuner's
choices; the CLI prints `CompileReport.table()`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kernl.artifacts import Bucket
from kernl.artifacts.writer import artifact_files

from .op_counts import OpCounts
from .plural import count
from .tune import TuneRecord

Progress = Callable[[str], None]


@dataclass
class BucketReport:
    bucket: Bucket
    seconds: float
    max_abs_error: float
    counts: OpCounts  # the same count `kernl inspect` shows

    @property
    def instructions(self) -> int:
        return self.counts.instructions


@dataclass
class CompileReport:
    path: Path
    task: str
    dtype: str
    device: str
    buckets: list[BucketReport] = field(default_factory=list)
    artifact_bytes: int = 0
    seconds: float = 0.0
    tuning: dict[Bucket, list[TuneRecord]] = field(default_factory=dict)
    compiled_ahead: int = 0  # tuning candidates compiled on threads first (compile_ahead.py)
    compile_threads: int = 0
    not_served: list[str] = field(default_factory=list)  # the model's non-tensor outputs

    def table(self) -> str:
        lines = [
            f"{'bucket':>12}  {'time (s)':>8}  {'max |err| vs eager':>18}  {'kernels/call':>12}  "
            f"{'instructions':>12}  {'kernl ops':>9}  {'on Triton':>9}",
            f"{'-' * 12}  {'-' * 8}  {'-' * 18}  {'-' * 12}  {'-' * 12}  {'-' * 9}  {'-' * 9}",
        ]
        for r in self.buckets:
            name = f"{r.bucket.batch}x{r.bucket.seq}"
            c = r.counts
            lines.append(
                f"{name:>12}  {r.seconds:8.2f}  {r.max_abs_error:18.3g}  "
                f"{'?' if c.launches is None else c.launches:>12}  {c.instructions:12d}  "
                f"{c.kernl_ops:9d}  {c.on_triton:9d}"
            )
        lines.extend(self.tuning_table())
        records = [r for rs in self.tuning.values() for r in rs]
        if any(r.time_us is not None for r in records):
            skipped = sum(len(r.errors) for r in records)
            ahead = (
                f" ({self.compiled_ahead} compiled ahead on "
                f"{count(self.compile_threads, 'thread')})"
                if self.compiled_ahead
                else ""
            )
            lines.append(
                f"tuning: {count(sum(r.timed for r in records), 'candidate')} timed{ahead}, "
                f"{count(sum(r.cached for r in records), 'kernel instance')} from the cache or "
                f"an equal shape, {count(skipped, 'config')} skipped (failed to compile or run; "
                "KERNL_VERBOSE=1 shows the compiler's output)"
            )
        if self.not_served:
            lines.append(f"not served (not tensors): {', '.join(self.not_served)}")
        lines.append(
            f"artifact {self.path} ({self.artifact_bytes / 2**20:.1f} MiB), task {self.task}, "
            f"{self.dtype} on {self.device}, {count(len(self.buckets), 'bucket')} in "
            f"{self.seconds:.1f} s"
        )
        return "\n".join(lines)

    def tuning_table(self) -> list[str]:
        """Per bucket, each kernel instance: chosen implementation and config, its time, and
        the time of the aten implementation it replaced."""
        lines: list[str] = []
        every = [r for records in self.tuning.values() for r in records if r.time_us is not None]
        # as wide as the longest op and impl: "kernl.bert_embeddings" ran past a fixed 17
        op_w = max([17, *(len(r.op) for r in every)])
        impl_w = max([6, *(len(r.impl) for r in every)])
        for bucket, records in self.tuning.items():
            timed = [r for r in records if r.time_us is not None]
            if not timed:
                counts = next((r.counts for r in self.buckets if r.bucket == bucket), None)
                if records and counts is not None:  # the count `kernl inspect` shows
                    lines.append(
                        f"  {bucket.batch}x{bucket.seq}: {count(counts.kernl_ops, 'kernl op')}, "
                        f"{counts.on_triton} on Triton kernels with default configs (no GPU to "
                        f"tune on), {counts.kernl_ops - counts.on_triton} on aten"
                    )
                continue
            total, aten = sum(r.time_us for r in timed), sum(r.aten_time_us for r in timed)
            failed = sum(len(r.errors) for r in timed)
            lines.append(
                f"  {bucket.batch}x{bucket.seq}: {count(len(timed), 'kernel instance')}, "
                f"{total:.0f} us tuned vs {aten:.0f} us aten (GPU time under graph "
                f"replay); {count(failed, 'config')} skipped (failed to compile or run)"
            )
            errors = sorted({e for r in timed for e in r.errors})[:3]
            lines.extend(f"    skipped: {e}" for e in errors)
            for r in timed:
                cfg = "" if r.config is None else " ".join(f"{k}={v}" for k, v in r.config.items())
                lines.append(
                    f"    #{r.index:<4} {r.op:<{op_w}} {r.impl:<{impl_w}} {r.time_us:8.1f} us "
                    f"(aten {r.aten_time_us:8.1f} us){' cached' if r.cached else ''}  {cfg}"
                    + (f"  [{r.approximation}]" if r.approximation else "")
                )
        return lines


def artifact_bytes(path: Path) -> int:
    """Bytes of every file of the artifact committed at `path`: the files its manifest lists,
    the manifest and a signature (the writer's size before commit has neither), not a file a
    user keeps in the folder (a tokenizer.json)."""
    return sum(
        (path / rel).stat().st_size for rel in artifact_files(path) if (path / rel).is_file()
    )
