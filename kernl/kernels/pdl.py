"""Programmatic dependent launch (PDL, Hopper and later), the kernels' side: a kernel launched
with `launch_pdl=True` may start while the kernel before it on the stream drains; it must call
`pdl_start(USE_PDL)` before touching memory the previous kernel writes or reads. `pdl_kwargs(pdl)`
are the launch arguments that go with it (a `USE_PDL` constexpr and, when on, Triton's
`launch_pdl` option). Triton 3.6's interpreter cannot run gdc_wait (an InterpreterError: it is
inline PTX), so PDL is off there (`pdl_kwargs` says so) and CPU tests cover everything but the
instructions.

When the next kernel may launch is the trigger (`USE_PDL`): at the start (right after the wait)
suits a kernel of one wave or less, whose programs all run at once, so the next kernel's
programs fill the SMs it leaves idle and start their weight prefetch early. A weight-streaming
kernel of several waves instead triggers after its main loop (`pdl_release`): triggered at the
start, the next kernel's waiting programs would hold SM slots its own later waves need. Either
way the next kernel's `gdc_wait` waits for this whole grid to finish and flush, so the trigger
moves only timing, never what is read."""

from __future__ import annotations

from typing import Any

from .jit import TritonName, jit, next_power_of_2, tl
from .launch import is_interpreted

# Triton's PTX builtins for PDL (triton.language.extra.cuda), bound when Triton is imported
gdc_wait = TritonName("triton.language.extra.cuda", "gdc_wait")
gdc_launch_dependents = TritonName("triton.language.extra.cuda", "gdc_launch_dependents")

# USE_PDL values. Off and at-start stay False and True: a binary's launch key holds the
# constexpr's repr, so artifacts compiled before the after-loop trigger keep loading.
PDL_OFF = False
TRIGGER_AT_START = True  # == 1 inside the kernels
TRIGGER_AFTER_LOOP = 2
# The trigger of the weight-streaming kernels (the linears, lm_head): after their main loop,
# measured against at the start in benchmarks/profile_decode_variants.py (docs/performance.md).
streaming_trigger = TRIGGER_AFTER_LOOP


@jit
def pdl_start(USE_PDL: tl.constexpr):
    """With PDL: wait until the previous kernel on the stream has finished and its writes are
    visible (nothing before this may read or write shared buffers); with the trigger at the
    start, then let the next kernel launch: its programs start and wait in turn."""
    if USE_PDL != 0:
        gdc_wait()
    if USE_PDL == 1:  # TRIGGER_AT_START
        gdc_launch_dependents()


@jit
def pdl_release(USE_PDL: tl.constexpr):
    """With the trigger after the main loop: this program has issued all its weight loads, so
    the next kernel may launch (it does once every program of this grid got here or exited)."""
    if USE_PDL == 2:  # TRIGGER_AFTER_LOOP
        gdc_launch_dependents()


@jit
def prefetch_rows_l2(rows, row_mask, k_lo, k_hi, LINES: tl.constexpr, DTYPE: tl.constexpr):
    """Ask L2 for the first LINES 128-byte lines of each row's [k_lo, k_hi) (rows: pointers to
    the rows' starts, [R, 1]): `prefetch.global.L2` loads nothing into registers, so a kernel
    launched early by PDL can start the weight stream before it waits for its inputs."""
    step: tl.constexpr = 1024 // DTYPE.primitive_bitwidth  # elements per 128-byte line
    ks = k_lo + tl.arange(0, LINES) * step
    mask = row_mask[:, None] & (ks < k_hi)[None, :]
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r",
        [rows + ks[None, :], mask.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


MAX_PREFETCH_LINES = 16  # per row: 2 KB, a first few pipeline stages' worth


def prefetch_lines(on: bool, k_span: int, weight, kernel) -> int:
    """PREFETCH for a launch: the lines per row that cover `k_span` elements (a power of two,
    at most MAX_PREFETCH_LINES), or 0 when off or interpreted (no inline PTX there)."""
    if not on or is_interpreted(kernel):
        return 0
    lines = -(-k_span * weight.element_size() // 128)
    return min(MAX_PREFETCH_LINES, next_power_of_2(max(1, lines)))


def pdl_kwargs(pdl: bool, interpreted: bool = False, streaming: bool = False) -> dict[str, Any]:
    """The launch arguments of a kernel that calls `pdl_start(USE_PDL)`; `streaming`: a
    weight-streaming kernel that calls `pdl_release(USE_PDL)` after its main loop (its
    trigger is `streaming_trigger`)."""
    if pdl and not interpreted:
        trigger = streaming_trigger if streaming else TRIGGER_AT_START
        return {"USE_PDL": trigger, "launch_pdl": True}
    return {"USE_PDL": PDL_OFF}
