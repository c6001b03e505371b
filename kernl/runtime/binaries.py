"""Launch kernl's Triton kernels from precompiled cubins, without Triton's JIT, launcher
build or a C compiler.

kernl's kernel launchers go through `kernl.kernels.launch.launch_kernel`. A loaded model runs its
program inside `launching_with(its KernelBinaries)`: each launch computes a launch key
(kernel, constexpr values, launch options, argument specialisation), finds the binary that
artifact compiled for that key at build time and launches it through the CUDA driver. A kernl
kernel with no binary is an error, never a silent compilation — unless the compiler is
recording (`allow_jit`), which is how the binaries are made in the first place. Outside a
model's run (tests, the compiler, a user's own Triton code) Triton's JIT works as usual.

A launch whose key carries `launch_pdl=True` (programmatic dependent launch, see
kernl/kernels/launch.py) or `launch_cooperative_grid=True` (a persistent kernel whose programs
wait for each other: kernels/decode_step.py) goes through `cuLaunchKernelEx` with the
programmatic stream serialization or cooperative attribute, as Triton's own launcher does;
every other launch through `cuLaunchKernel`."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kernl.kernels.launch import is_interpreted, jit_launch, launching_with
from kernl.kernels.tma import TensorDesc

_LAUNCH_OPTIONS = (
    "num_warps",
    "num_stages",
    "num_ctas",
    "maxnreg",
    "launch_pdl",
    "launch_cooperative_grid",
    "enable_fp_fusion",
)
_SCALAR_CTYPES = {
    "i1": ctypes.c_int8,
    "i8": ctypes.c_int8,
    "i16": ctypes.c_int16,
    "i32": ctypes.c_int32,
    "i64": ctypes.c_int64,
    "u1": ctypes.c_uint8,
    "u8": ctypes.c_uint8,
    "u16": ctypes.c_uint16,
    "u32": ctypes.c_uint32,
    "u64": ctypes.c_uint64,
    "fp32": ctypes.c_float,
    "f32": ctypes.c_float,
    "fp64": ctypes.c_double,
}


class MissingBinaryError(RuntimeError):
    pass


# cuda.h's CUlaunchAttribute (id, padding to 8, a 64-byte union) and CUlaunchConfig
_CU_LAUNCH_ATTRIBUTE_COOPERATIVE = 2
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint64 * 8)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("numAttrs", ctypes.c_uint),
    ]


def _ex_config(
    grid: tuple[int, int, int],
    block_x: int,
    shared: int,
    stream: ctypes.c_void_p,
    pdl: bool,
    cooperative: bool,
) -> tuple[_LaunchConfig, ctypes.Array]:
    """A launch config with programmatic stream serialization and/or a cooperative grid on
    (the attributes are returned too: they must outlive the call)."""
    ids = [_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION] if pdl else []
    ids += [_CU_LAUNCH_ATTRIBUTE_COOPERATIVE] if cooperative else []
    attrs = (_LaunchAttribute * len(ids))()
    for attr, attr_id in zip(attrs, ids):
        attr.id = attr_id
        attr.value[0] = 1  # the union's int (allowed / cooperative), little-endian
    config = _LaunchConfig(*grid, block_x, 1, 1, shared, stream, attrs, len(ids))
    return config, attrs


def _spec(value: Any) -> str:
    if isinstance(value, TensorDesc):  # Triton specialises a descriptor on these alone
        kind = "gdesc" if value.gluon else "desc"  # Gluon's: with its block's default layout
        return f"{kind}<{str(value.base.dtype).removeprefix('torch.')}{list(value.block_shape)}>"
    if isinstance(value, torch.Tensor):
        return f"*{str(value.dtype).removeprefix('torch.')}:{'A' if value.data_ptr() % 16 == 0 else 'u'}"
    if isinstance(value, bool):
        return f"b{int(value)}"
    if isinstance(value, int):
        size = "32" if -(2**31) <= value < 2**31 else "64"
        return f"i{size}{':one' if value == 1 else ''}{':D' if value % 16 == 0 else ''}"
    if isinstance(value, float):
        return "f"
    if value is None:
        return "none"
    return f"?{type(value).__name__}"


def bind(jit_fn, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bound arguments (with defaults, in declaration order) and launch options."""
    options = {k: kwargs[k] for k in list(kwargs) if k not in jit_fn.arg_names}
    params = {k: v for k, v in kwargs.items() if k in jit_fn.arg_names}
    bound = jit_fn.signature.bind(*args, **params)
    bound.apply_defaults()
    return dict(bound.arguments), options


def launch_key(jit_fn, bound: dict[str, Any], options: dict[str, Any]) -> str:
    parts = [f"{jit_fn.fn.__module__}.{jit_fn.fn.__name__}"]
    for p in jit_fn.params:
        value = bound[p.name]
        parts.append(f"{p.name}={value!r}" if p.is_constexpr else f"{p.name}:{_spec(value)}")
    for k in sorted(options):
        if k in _LAUNCH_OPTIONS:
            parts.append(f"{k}={options[k]!r}")
    return "|".join(parts)


def _param_names(key: str) -> tuple[str, ...]:
    """A launch key's kernel parameter names, in order (launch options left out)."""
    names = (part.split("=", 1)[0].split(":", 1)[0] for part in key.split("|")[1:])
    return tuple(n for n in names if n not in _LAUNCH_OPTIONS)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class BinarySpec:
    """What the compiler stores for one compiled kernel (manifest `kernels` entry + cubin)."""

    key: str
    function: str
    num_warps: int
    num_ctas: int
    shared: int
    arg_types: list[list[str]]  # [param name, triton type] for each runtime parameter


_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
_libcuda = None


def _cuda():
    """The CUDA driver library, through ctypes: no binding package, no compiler."""
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
    return _libcuda


def _check(err: int, what: str) -> None:
    if err != 0:
        name = ctypes.c_char_p()
        _cuda().cuGetErrorName(err, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: CUDA error {err} ({(name.value or b'?').decode()})")


# A TMA descriptor argument is stored as "nvTmaDesc:<swizzle>:<elem size>:<elem type>:<box>",
# from Triton's tensordesc metadata, and followed by entries "<name>.shape.<i>" (i32) and
# "<name>.strides.<i>" (i64): the parameters Triton's launcher passes after the CUtensorMap.
_TMA_TYPE = "nvTmaDesc:"
# cuda.h's enums as Triton's fill_tma_descriptor passes them; its device-side element type
# numbering differs from the host's in three places (Triton's TMA_DTYPE_DEVICE_TO_HOST)
_TMA_DTYPE_DEVICE_TO_HOST = {8: 10, 9: 8, 10: 9}
_CU_TENSOR_MAP_INTERLEAVE_NONE = 0
_CU_TENSOR_MAP_L2_PROMOTION_L2_128B = 2
_CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0


def _tensor_map() -> ctypes.Array:
    """Room for one CUtensorMap: 128 opaque bytes, 64-byte aligned (ctypes aligns less)."""
    raw = ctypes.create_string_buffer(128 + 64)
    offset = -ctypes.addressof(raw) % 64
    return (ctypes.c_uint8 * 128).from_buffer(raw, offset)  # keeps `raw` alive


def _bound_value(bound: dict[str, Any], name: str) -> Any:
    """A kernel parameter's value; "<desc>.shape.<i>" and "<desc>.strides.<i>" read a
    TensorDesc argument's fields."""
    if "." not in name:
        return bound[name]
    arg, field, index = name.split(".")
    return getattr(bound[arg], field)[int(index)]


def tma_arg_types(name: str, signature: str, meta: dict | None) -> list[list[str]]:
    """Build time: the stored parameters for one tensordesc argument of a compiled kernel."""
    if meta is None or meta.get("fp4_padded"):
        raise MissingBinaryError(f"{name}: a tensor descriptor not lowered to TMA cannot be stored")
    box = "x".join(str(b) for b in meta["block_size"])
    ty = f"{_TMA_TYPE}{meta['swizzle']}:{meta['elem_size']}:{meta['elem_type']}:{box}"
    rank = len(meta["block_size"])
    dims = signature.split("[", 1)[1].split("]", 1)[0]  # a Gluon one names its layout after
    if dims.count(",") + 1 != rank:
        raise MissingBinaryError(f"{name}: {signature} does not match its TMA box {box}")
    out = [[name, ty]]
    out += [[f"{name}.shape.{i}", "i32"] for i in range(rank)]
    out += [[f"{name}.strides.{i}", "i64"] for i in range(rank)]
    return out


def encode_tensor_map(desc: TensorDesc, ty: str) -> ctypes.Array:
    """The CUtensorMap of `desc` as Triton's launcher fills it (fill_tma_descriptor):
    dimensions innermost first, byte strides of the outer ones, the compiled kernel's box."""
    swizzle, elem_size, elem_type, box = ty[len(_TMA_TYPE) :].split(":")
    elem_size, block = int(elem_size), [int(b) for b in box.split("x")]
    if desc.base.element_size() != elem_size:
        raise MissingBinaryError(f"a {desc.base.dtype} descriptor for a {ty} parameter")
    rank = len(block)
    dims = (ctypes.c_uint64 * rank)(*reversed(desc.shape))
    strides = (ctypes.c_uint64 * rank)(*[s * elem_size for s in reversed(desc.strides[:-1])])
    boxes = (ctypes.c_uint32 * rank)(*reversed(block))
    ones = (ctypes.c_uint32 * rank)(*([1] * rank))
    tensor_map = _tensor_map()
    _check(
        _cuda().cuTensorMapEncodeTiled(
            ctypes.byref(tensor_map),
            ctypes.c_int(_TMA_DTYPE_DEVICE_TO_HOST.get(int(elem_type), int(elem_type))),
            ctypes.c_uint32(rank),
            ctypes.c_void_p(desc.base.data_ptr()),
            dims,
            strides,
            boxes,
            ones,
            ctypes.c_int(_CU_TENSOR_MAP_INTERLEAVE_NONE),
            ctypes.c_int(int(swizzle)),
            ctypes.c_int(_CU_TENSOR_MAP_L2_PROMOTION_L2_128B),
            ctypes.c_int(_CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
        ),
        "cuTensorMapEncodeTiled",
    )
    return tensor_map


class _Loaded:
    def __init__(self, spec: BinarySpec, cubin: bytes, device: torch.device):
        cu = _cuda()
        self.spec = spec
        torch.cuda.current_stream(device)  # makes torch's primary context current here
        self._image = ctypes.create_string_buffer(cubin, len(cubin))
        self.module = ctypes.c_void_p()
        _check(cu.cuModuleLoadData(ctypes.byref(self.module), self._image), "cuModuleLoadData")
        self.function = ctypes.c_void_p()
        _check(
            cu.cuModuleGetFunction(
                ctypes.byref(self.function), self.module, spec.function.encode()
            ),
            f"cuModuleGetFunction({spec.function})",
        )
        if spec.shared > 49152:
            static, optin = ctypes.c_int(), ctypes.c_int()
            _check(
                cu.cuFuncGetAttribute(
                    ctypes.byref(static), _CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self.function
                ),
                "cuFuncGetAttribute",
            )
            _check(
                cu.cuDeviceGetAttribute(
                    ctypes.byref(optin),
                    _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                    device.index or 0,
                ),
                "cuDeviceGetAttribute",
            )
            _check(
                cu.cuFuncSetAttribute(
                    self.function,
                    _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    optin.value - static.value,
                ),
                "cuFuncSetAttribute",
            )

    def launch(
        self,
        grid: tuple[int, int, int],
        bound: dict[str, Any],
        pdl: bool = False,
        cooperative: bool = False,
    ) -> None:
        gx, gy, gz = grid
        if gx * gy * gz == 0:
            return
        holders: list = []
        for name, ty in self.spec.arg_types:
            value = _bound_value(bound, name)
            if ty.startswith(_TMA_TYPE):
                holders.append(encode_tensor_map(value, ty))
            elif ty.startswith("*"):
                holders.append(ctypes.c_uint64(0 if value is None else value.data_ptr()))
            elif ty in _SCALAR_CTYPES:
                holders.append(_SCALAR_CTYPES[ty](value))
            else:
                raise MissingBinaryError(
                    f"argument type {ty} of {self.spec.function} is not supported"
                )
        holders += [ctypes.c_uint64(0), ctypes.c_uint64(0)]  # global and profile scratch
        params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if pdl or cooperative:
            config, _attrs = _ex_config(
                (gx * self.spec.num_ctas, gy, gz),
                32 * self.spec.num_warps,
                self.spec.shared,
                stream,
                pdl,
                cooperative,
            )
            _check(
                _cuda().cuLaunchKernelEx(ctypes.byref(config), self.function, params, None),
                f"cuLaunchKernelEx({self.spec.function})",
            )
            return
        _check(
            _cuda().cuLaunchKernel(
                self.function,
                gx * self.spec.num_ctas,
                gy,
                gz,
                32 * self.spec.num_warps,
                1,
                1,
                self.spec.shared,
                stream,
                params,
                None,
            ),
            f"cuLaunchKernel({self.spec.function})",
        )


class KernelBinaries:
    """One loaded artifact's kernel binaries on one device, by launch key; a launcher for
    `kernl.kernels.launch.launching_with`. Owned by the model that loaded them: two artifacts
    whose kernels share a key keep their own binaries, and Triton's JIT stays untouched."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loaded: dict[str, _Loaded] = {}

    def add(self, spec: BinarySpec, cubin: bytes) -> None:
        with torch.cuda.device(self.device):
            self.loaded[spec.key] = _Loaded(spec, cubin, self.device)

    def __len__(self) -> int:
        return len(self.loaded)

    def _missing(self, key: str) -> str:
        """Why `key` has no binary. When the artifact holds binaries of the same kernel built
        with other parameters, the kernel changed since it was built: another kernl built it,
        and only a recompile helps (a changed constexpr is a new launch key)."""
        kernel = key.split("|", 1)[0]
        here = _param_names(key)
        built = {_param_names(k) for k in self.loaded if k.split("|", 1)[0] == kernel}
        if built and here not in built:
            old = set().union(*built)
            change = [f"+{p}" for p in here if p not in old]
            change += [f"-{p}" for p in sorted(old - set(here))]
            return (
                f"this artifact's binaries of {kernel} were built for other kernel parameters "
                f"than this kernl's ({', '.join(change)}): another version of kernl built "
                "it. Recompile the artifact with this kernl (kernl-compile)."
            )
        return (
            f"kernel launch {key} has no precompiled binary in the loaded artifact; kernl "
            "never compiles kernels at run time. Was the artifact built for this bucket "
            "and GPU?"
        )

    def __call__(self, jit_fn, grid, args: tuple, kwargs: dict) -> None:
        bound, options = bind(jit_fn, args, kwargs)
        key = launch_key(jit_fn, bound, options)
        loaded = self.loaded.get(key)
        if loaded is None:
            raise MissingBinaryError(self._missing(key))
        with torch.cuda.device(self.device):
            loaded.launch(
                _grid3(grid, bound),
                bound,
                pdl=bool(options.get("launch_pdl", False)),
                cooperative=bool(options.get("launch_cooperative_grid", False)),
            )


def _grid3(grid, bound) -> tuple[int, int, int]:
    g = grid(bound) if callable(grid) else grid
    g = tuple(int(x) for x in g) + (1, 1)
    return g[0], g[1], g[2]


@contextmanager
def running_with(binaries: KernelBinaries | None, device: torch.device) -> Iterator[None]:
    """Where a loaded model runs its kernels: on its device, and through its own binaries
    when it has some (CPU mode and plain-torch artifacts leave the caller's launcher alone,
    so the compiler's recording reaches them)."""
    with ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        if binaries is not None:
            stack.enter_context(launching_with(binaries))
        yield


@contextmanager
def allow_jit(recorder: Callable[[str, Any], None] | None = None) -> Iterator[None]:
    """Build time: within this block kernl kernels compile through Triton's JIT, also inside a
    loaded model's run; each compiled launch is handed to `recorder(key, compiled_kernel)`
    if given (how the compiler collects the binaries it stores)."""

    def jit(jit_fn, grid, args: tuple, kwargs: dict):
        kernel = jit_launch(jit_fn, grid, args, kwargs)
        if recorder is not None and not is_interpreted(jit_fn):  # no binary on the CPU
            bound, options = bind(jit_fn, args, kwargs)
            recorder(launch_key(jit_fn, bound, options), kernel)
        return kernel

    with launching_with(jit):
        yield


def spec_from_compiled(key: str, kernel) -> tuple[BinarySpec, bytes]:
    """Build time: what to store for a compiled Triton kernel."""
    md = kernel.metadata
    for name in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, name, 0):
            raise MissingBinaryError(f"{md.name}: kernels needing {name} cannot be stored yet")
    signature = kernel.src.signature
    constants = {k[0] for k in getattr(kernel.src, "constants", {})}
    names = kernel.src.fn.arg_names
    tma_meta = list(getattr(md, "tensordesc_meta", None) or [])
    arg_types = []
    for i, name in enumerate(names):
        if signature[name] == "constexpr" or i in constants:
            continue
        if signature[name].startswith("tensordesc"):
            meta = tma_meta.pop(0) if tma_meta else None
            arg_types += tma_arg_types(name, signature[name], meta)
        else:
            arg_types.append([name, signature[name]])
    spec = BinarySpec(
        key=key,
        function=md.name,
        num_warps=md.num_warps,
        num_ctas=getattr(md, "num_ctas", 1),
        shared=md.shared,
        arg_types=arg_types,
    )
    return spec, kernel.asm["cubin"]
