"""cuBLASLt through ctypes, for benchmarks/bench_cublaslt_algos.py: a linear (x @ W^T + bias,
optionally GELU) run with an algorithm chosen by the caller, not by cuBLASLt's heuristic.

torch's `addmm` asks cuBLASLt's heuristic for one algorithm and runs it. The heuristic ranks
its candidates by a model of their time, and on Hopper its first pick for BERT-base's FFN1
at M = 4096 adds a workspace memset and ~3 µs of idle before the GEMM (docs/performance.md,
twelfth session). Here the bench lists the heuristic's candidates and times each; a compiler
could store the fastest one's 64-byte descriptor (cuBLASLt documents `cublasLtMatmulAlgo_t`
as trivially serialisable for the same cuBLAS version) for the runtime to run. Measured on
the H200 (2026-12-03, docs/performance.md), the best of them was within 3% of torch's call
at every BERT-base linear, so kernl does not do that.

Only what kernl's linear needs: fp16/bf16 x [M, K] and W [N, K] row-major (nn.Linear's
layout), a bias of N, output [M, N] row-major, fp32 accumulation, epilogue bias or
bias + GELU (cuBLASLt's GELU is the tanh one). In cuBLAS's column-major terms this is
D[N, M] = op(W) @ x^T with W transposed, as torch itself calls it (the outputs were equal
to torch's bit for bit)."""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass

import torch

# cublasLt.h / library_types.h / cublas_api.h values
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_PREF_MAX_WORKSPACE_BYTES = 1
_ALGO_CONFIG_ID, _ALGO_CONFIG_TILE_ID = 0, 1
EPILOGUES = {"none": 1, "bias": 4, "relu_bias": 6, "gelu_bias": 36}
_DTYPES = {torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}
WORKSPACE_BYTES = 32 * 1024 * 1024


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", _Algo),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves_count", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


_lib = None


def library() -> ctypes.CDLL:
    """libcublasLt, the copy torch loaded (found by its soname once torch used cuBLAS),
    else the one under an installed nvidia-cublas package."""
    global _lib
    if _lib is not None:
        return _lib
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    for base in sys.path:
        names += sorted(
            glob.glob(os.path.join(base, "nvidia", "**", "libcublasLt.so*"), recursive=True)
        )
    errors = []
    for name in names:
        try:
            _lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise OSError("libcublasLt not found: " + "; ".join(errors[:3]))
    L = _lib
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    L.cublasLtCreate.argtypes = [ctypes.POINTER(vp)]
    L.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int]
    L.cublasLtMatmulDescSetAttribute.argtypes = [vp, ctypes.c_int, vp, sz]
    L.cublasLtMatrixLayoutCreate.argtypes = [
        ctypes.POINTER(vp), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64,
    ]  # fmt: skip
    L.cublasLtMatmulPreferenceCreate.argtypes = [ctypes.POINTER(vp)]
    L.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ctypes.c_int, vp, sz]
    L.cublasLtMatmulAlgoGetHeuristic.argtypes = [
        vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, ctypes.POINTER(_HeuristicResult),
        ctypes.POINTER(ctypes.c_int),
    ]  # fmt: skip
    L.cublasLtMatmul.argtypes = [
        vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(_Algo), vp, sz, vp,
    ]  # fmt: skip
    L.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [
        ctypes.POINTER(_Algo), ctypes.c_int, vp, sz, ctypes.POINTER(sz),
    ]  # fmt: skip
    for fn in (
        "cublasLtMatmulDescDestroy",
        "cublasLtMatrixLayoutDestroy",
        "cublasLtMatmulPreferenceDestroy",
    ):
        getattr(L, fn).argtypes = [vp]
    return L


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: cuBLAS status {status}")


_handles: dict[int, ctypes.c_void_p] = {}


def _handle(device: torch.device) -> ctypes.c_void_p:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        h = ctypes.c_void_p()
        with torch.cuda.device(index):
            _check(library().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
        _handles[index] = h
    return _handles[index]


@dataclass
class LinearPlan:
    """One linear's cuBLASLt descriptors (its shapes, dtype, epilogue), reusable across calls
    on tensors of those shapes; `bias_ptr` is set per call."""

    M: int
    N: int
    K: int
    dtype: torch.dtype
    epilogue: str
    desc: ctypes.c_void_p
    layouts: tuple[ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    @classmethod
    def make(cls, M: int, N: int, K: int, dtype: torch.dtype, epilogue: str) -> LinearPlan:
        L = library()
        desc = ctypes.c_void_p()
        _check(
            L.cublasLtMatmulDescCreate(ctypes.byref(desc), _CUBLAS_COMPUTE_32F, _CUDA_R_32F), "desc"
        )
        for attr, value in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(value)
            _check(L.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), 4), "trans")
        ep = ctypes.c_uint32(EPILOGUES[epilogue])
        _check(
            L.cublasLtMatmulDescSetAttribute(desc, _DESC_EPILOGUE, ctypes.byref(ep), 4), "epilogue"
        )
        t = _DTYPES[dtype]
        a, b, d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        # column-major: A = W as K x N (ld K, transposed), B = x as K x M, D = out as N x M
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(a), t, K, N, K), "layout A")
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(b), t, K, M, K), "layout B")
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(d), t, N, M, N), "layout D")
        return cls(M, N, K, dtype, epilogue, desc, (a, b, d))

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if self.epilogue == "none":
            return
        ptr = ctypes.c_void_p(bias.data_ptr())
        _check(
            library().cublasLtMatmulDescSetAttribute(
                self.desc, _DESC_BIAS_POINTER, ctypes.byref(ptr), 8
            ),
            "bias pointer",
        )

    def candidates(self, bias: torch.Tensor | None, count: int = 32) -> list[_Algo]:
        """cuBLASLt's heuristic's algorithms for this linear, best guess first."""
        L = library()
        self._set_bias(bias)
        pref = ctypes.c_void_p()
        _check(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        _check(
            L.cublasLtMatmulPreferenceSetAttribute(
                pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8
            ),
            "workspace preference",
        )
        results = (_HeuristicResult * count)()
        returned = ctypes.c_int(0)
        a, b, d = self.layouts
        _check(
            L.cublasLtMatmulAlgoGetHeuristic(
                _handle(torch.device("cuda")), self.desc, a, b, d, d, pref, count, results,
                ctypes.byref(returned),
            ),
            "cublasLtMatmulAlgoGetHeuristic",
        )  # fmt: skip
        L.cublasLtMatmulPreferenceDestroy(pref)
        return [_copy(results[i].algo) for i in range(returned.value) if results[i].state == 0]

    def run(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        algo: _Algo,
        workspace: torch.Tensor,
    ) -> torch.Tensor:
        """out [M, N] = epilogue(x [M, K] @ weight[N, K]^T + bias) with `algo`, on torch's
        current stream (capturable in a CUDA graph like any cuBLAS call)."""
        self._set_bias(bias)
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        a, b, d = self.layouts
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        _check(
            library().cublasLtMatmul(
                _handle(x.device), self.desc, ctypes.byref(alpha),
                ctypes.c_void_p(weight.data_ptr()), a, ctypes.c_void_p(x.data_ptr()), b,
                ctypes.byref(beta), ctypes.c_void_p(out.data_ptr()), d,
                ctypes.c_void_p(out.data_ptr()), d, ctypes.byref(algo),
                ctypes.c_void_p(workspace.data_ptr()), workspace.numel(), stream,
            ),
            "cublasLtMatmul",
        )  # fmt: skip
        return out


def _copy(algo: _Algo) -> _Algo:
    out = _Algo()
    ctypes.memmove(ctypes.byref(out), ctypes.byref(algo), ctypes.sizeof(_Algo))
    return out


def algo_to_hex(algo: _Algo) -> str:
    return bytes(algo).hex()


def algo_from_hex(text: str) -> _Algo:
    raw = bytes.fromhex(text)
    if len(raw) != ctypes.sizeof(_Algo):
        raise ValueError(f"a cuBLASLt algorithm is {ctypes.sizeof(_Algo)} bytes, not {len(raw)}")
    return _Algo.from_buffer_copy(raw)


def describe(algo: _Algo) -> str:
    """The algorithm's id and tile id, for reports."""
    L = library()
    out = []
    for attr in (_ALGO_CONFIG_ID, _ALGO_CONFIG_TILE_ID):
        v, n = ctypes.c_int32(), ctypes.c_size_t()
        L.cublasLtMatmulAlgoConfigGetAttribute(
            ctypes.byref(algo), attr, ctypes.byref(v), 4, ctypes.byref(n)
        )
        out.append(v.value)
    return f"id {out[0]} tile {out[1]}"
