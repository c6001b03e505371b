"""How every kernl launcher starts its Triton kernel: `launch_kernel(kernel, grid, *args, **kwargs)`.

By default that is Triton's own `kernel[grid](...)`: kernel tests, the compiler and a user's
plain Triton code see the JIT they expect. A loaded artifact instead runs its program inside
`launching_with(its_binaries)`, which routes kernl's launches *on this thread, for the length
of that block* to the artifact's precompiled binaries. Nothing process-wide is patched, so two
loaded models, the compiler and plain Triton code live in one process.

Triton's interpreter (CPU mode) rewrites `triton.language` globally while a kernel runs, so
two threads interpreting at once corrupt each other: interpreted launches are serialised.

Programmatic dependent launch, the kernels' side of it, is pdl.py. This module imports no
Triton, and neither do the kernel modules (their kernels are made on first use, jit.py): the
runtime imports them to launch binaries, and Triton's import (~0.14 s) is part of neither
`import kernl.runtime` nor `load()`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from .jit import interpret_requested, is_made, made
from .tma import TensorDesc

# (kernel, grid, args, kwargs) -> whatever the launch returns
Launcher = Callable[[Any, Any, tuple, dict], Any]

_launcher: ContextVar[Launcher | None] = ContextVar("kernl_launcher", default=None)
_interpreter_lock = threading.RLock()


def launch_kernel(kernel, grid, *args, **kwargs) -> Any:
    """Launch `kernel` over `grid` with the launcher of the current context (Triton's JIT
    unless a loaded artifact or the compiler installed another)."""
    launcher = _launcher.get()
    if launcher is not None:
        return launcher(kernel, grid, args, kwargs)
    return jit_launch(kernel, grid, args, kwargs)


def jit_launch(kernel, grid, args: tuple, kwargs: dict) -> Any:
    """Triton's own launch; interpreted launches one at a time per process."""
    kernel = made(kernel)
    args = triton_args(args)
    if is_interpreted(kernel):
        with _interpreter_lock:
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


def triton_args(args: tuple) -> tuple:
    """A launch's arguments as Triton's JIT takes them: kernl's TMA descriptors as Triton's."""
    if not any(isinstance(a, TensorDesc) for a in args):
        return args
    return tuple(a.to_triton() if isinstance(a, TensorDesc) else a for a in args)


_sm_counts: dict[int, int] = {}
# "SMs" where there is no GPU (the interpreter): few, so that tests of a persistent grid walk
# several tiles per program as the GPU's grid does
_CPU_SMS = 2


def sm_count(device: torch.device) -> int:
    """The SMs a persistent grid spreads over on `device` (cached per device)."""
    if device.type != "cuda":
        return _CPU_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def is_interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter. A kernel not made yet (jit.py) is made
    here only when the interpreter is asked for: on the GPU the question must not import
    Triton."""
    if not is_made(kernel):
        if not interpret_requested():
            return False
        kernel = made(kernel)
    return type(kernel).__name__ == "InterpretedFunction"


@contextmanager
def launching_with(launcher: Launcher | None) -> Iterator[None]:
    """Within this block (this thread or task only), kernl's launches go to `launcher`;
    `None` restores Triton's JIT (used by the compiler inside a loaded model's context)."""
    token = _launcher.set(launcher)
    try:
        yield
    finally:
        _launcher.reset(token)
