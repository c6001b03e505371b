"""`@jit`, Triton's `@triton.jit` made on first use, so that importing a kernel module imports
no Triton.

A loaded artifact launches its kernels from precompiled binaries (kernl/runtime/binaries.py):
all it needs of a kernel is its name and its parameters, which `LazyJIT` reads from the Python
function itself. Triton's import (0.09–0.17 s on the H200's host, a tenth of a cold start) is
then paid only by what compiles or interprets kernels: the compiler, the kernel tests, CPU
mode.

The first time anything needs Triton's own JIT object (a JIT launch, `kernel.warmup`, any
attribute `LazyJIT` lacks), `made` imports Triton once and swaps every lazy name in the
kernel modules' globals (kernels, `tl`, `triton`, Triton builtins, `constexpr` constants) for
the real object. Triton's compiler and its interpreter, which resolve a kernel's globals
when they run it, then see exactly what a plain `@triton.jit` module would give them.

Kernel modules write `from .jit import jit, tl` instead of `import triton.language as tl`,
and use `cdiv` / `next_power_of_2` from here in their launchers: a launcher runs on the
binary path too, where touching `tl` or `triton` would import Triton after all."""

from __future__ import annotations

import importlib
import inspect
import os
import threading
from typing import Any

_lock = threading.RLock()
_unmade: list[LazyJIT] = []  # kernels defined since the last `_make_all`
_module_globals: dict[str, dict[str, Any]] = {}  # module name -> globals holding lazy names


class TritonName:
    """A module of Triton's, or one of its attributes (`attr`), imported when first used."""

    def __init__(self, module: str, attr: str | None = None) -> None:
        self.module, self.attr = module, attr

    def resolve(self) -> Any:
        module = importlib.import_module(self.module)
        return module if self.attr is None else getattr(module, self.attr)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"<lazy {self.module}{'.' + self.attr if self.attr else ''}>"


class _LazyConstexpr:
    """A module-level `tl.constexpr(value)` a kernel reads, made with the kernels."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def resolve(self) -> Any:
        return importlib.import_module("triton.language").constexpr(self.value)


tl = TritonName("triton.language")
triton = TritonName("triton")
gl = TritonName("triton.experimental.gluon.language")
# Gluon's Hopper names (the wgmma kernels): TMA copies, mbarriers and the asynchronous wgmma
_HOPPER = "triton.experimental.gluon.language.nvidia.hopper"
mbarrier = TritonName(f"{_HOPPER}.mbarrier")
tma = TritonName(f"{_HOPPER}.tma")
fence_async_shared = TritonName(_HOPPER, "fence_async_shared")
warpgroup_mma = TritonName(_HOPPER, "warpgroup_mma")
warpgroup_mma_init = TritonName(_HOPPER, "warpgroup_mma_init")
warpgroup_mma_wait = TritonName(_HOPPER, "warpgroup_mma_wait")


def constexpr(value: Any) -> Any:
    """A module-level constant a kernel reads (Triton wants a `tl.constexpr` there)."""
    return _LazyConstexpr(value)


class KernelParam:
    """What a launch key needs of a parameter (Triton's `KernelParam` says the same)."""

    def __init__(self, param: inspect.Parameter) -> None:
        self.name = param.name
        # `from __future__ import annotations` leaves "tl.constexpr" a string; Triton's own
        # test is the same substring test on the normalised annotation
        annotation = param.annotation
        self.is_constexpr = annotation is not inspect.Parameter.empty and "constexpr" in str(
            annotation
        )
        self.has_default = param.default is not inspect.Parameter.empty


class LazyJIT:
    """A `@jit` kernel before Triton is imported: name, signature and parameters as Triton's
    `JITFunction` has them; anything else makes the real one (`made`)."""

    def __init__(self, fn, gluon: bool = False) -> None:
        self.fn = fn
        self.gluon = gluon  # made with Gluon's `gluon.jit` (attention_wgmma.py)
        self.__name__ = fn.__name__
        self.__module__ = fn.__module__
        self.__doc__ = fn.__doc__
        self.signature = inspect.signature(fn)
        self.params = [KernelParam(p) for p in self.signature.parameters.values()]
        self.arg_names = [p.name for p in self.params]
        self._made = None
        with _lock:
            _unmade.append(self)
            _module_globals[fn.__module__] = fn.__globals__

    def made(self):
        """Triton's JITFunction (or InterpretedFunction) for this kernel."""
        if self._made is None:
            _make_all()
        return self._made

    def __getitem__(self, grid):
        return self.made()[grid]

    def __getattr__(self, name: str) -> Any:  # only what LazyJIT itself lacks
        if name.startswith("__") or name == "_made":
            raise AttributeError(name)
        return getattr(self.made(), name)

    def __repr__(self) -> str:
        return f"<lazy jit {self.__module__}.{self.__name__}>"


def jit(fn):
    """`@triton.jit`, made on first use (see the module's docstring)."""
    return LazyJIT(fn)


def gluon_jit(fn):
    """`@gluon.jit` (Triton's lower-level dialect), made on first use like `jit`. No
    interpreter runs Gluon: such a kernel is compiled for a GPU, or not at all."""
    return LazyJIT(fn, gluon=True)


def made(kernel):
    """The real Triton kernel for `kernel` (a LazyJIT or already one)."""
    return kernel.made() if isinstance(kernel, LazyJIT) else kernel


def is_made(kernel) -> bool:
    return not isinstance(kernel, LazyJIT) or kernel._made is not None


def interpret_requested() -> bool:
    """Whether Triton would make interpreted kernels now (it reads TRITON_INTERPRET when
    `triton.jit` runs, which for kernl's kernels is `_make_all`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def _make_all() -> None:
    """Import Triton, make every kernel defined so far, and put the real objects in the kernel
    modules' globals in place of the lazy ones."""
    with _lock:
        for kernel in _unmade:
            if kernel._made is None:
                kernel._made = _maker(kernel)(kernel.fn)
        _unmade.clear()
        for module_globals in _module_globals.values():
            for name, value in list(module_globals.items()):
                if isinstance(value, LazyJIT) and value._made is not None:
                    module_globals[name] = value._made
                elif isinstance(value, (TritonName, _LazyConstexpr)):
                    module_globals[name] = value.resolve()


def _maker(kernel: LazyJIT):
    """`triton.jit`, or `gluon.jit` for a Gluon kernel."""
    if kernel.gluon:
        from triton.experimental import gluon

        return gluon.jit
    import triton as triton_module

    return triton_module.jit


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (which gives 0 for 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()
