"""Shared checks for kernel tests: compare with a float64 reference, hold reduced precision
to 2x the error of stock PyTorch in the same dtype, and name the worst element on failure."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype against the float64 reference
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# slack added to the "2x stock PyTorch" bar so exact-ish cases do not fail on one ulp
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel forgets to write fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _worst(out: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (out.double() - ref.double()).abs().nan_to_num(float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"worst at {idx}: got {out[idx].item()!r}, want {ref[idx].item()!r}"


def assert_close(
    out: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype,
    stock: torch.Tensor | None = None,
    name: str = "",
) -> None:
    """out (kernel, `dtype`) vs ref64 (float64). With `stock` (the same op in stock PyTorch
    in `dtype`), reduced precision must also stay within 2x stock's error."""
    assert out.shape == ref64.shape, (name, out.shape, ref64.shape)
    ref64 = ref64.double().to(out.device)
    assert not out.isnan().any(), (
        f"{name}: NaN in output (unwritten or bad masking); {_worst(out, ref64)}"
    )
    atol, rtol = TOLERANCES[dtype]
    err = (out.double() - ref64).abs()
    bad = err > atol + rtol * ref64.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements off, max err {err.max().item():.3g}; {_worst(out, ref64)}"
    )
    if stock is not None and dtype != torch.float32:
        stock_err = (stock.double().to(out.device) - ref64).abs().max().item()
        ours = err.max().item()
        assert ours <= 2 * stock_err + EPS[dtype], (
            f"{name}: max err {ours:.3g} > 2x stock PyTorch {stock_err:.3g}; {_worst(out, ref64)}"
        )


def run_checks(checks) -> int:
    """A compile-check script's main: runs each (check, args), prints each failure; returns
    how many failed."""
    failed = 0
    for check, args in checks:
        try:
            check(*args)
        except Exception as e:  # noqa: BLE001 - reported, then the test fails
            failed += 1
            print(f"{check.__name__}{args} failed:\n{str(e)[-1500:]}\n")
    return failed


def assert_checks_pass_in_a_compiling_process(script: str) -> None:
    """Runs `script` (a test file whose `main` runs its sm_90 compile checks) in a fresh
    process where Triton compiles: TRITON_INTERPRET "0", not unset (without a GPU kernl turns
    the interpreter on when it is unset), and under the interpreter Gluon's helpers become
    interpreted functions it cannot call."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


def assert_binaries_in_a_graph_equal_the_jit(run, descriptors: int) -> None:
    """`run(out=None)` launches one kernel (and returns its output). Recorded as the compiler
    records it, then launched from its cubin with kernl's own CUtensorMaps (`descriptors` of
    them), eagerly and inside a CUDA graph: each bit for bit what the JIT computed."""
    from kernl.kernels.launch import launching_with
    from kernl.runtime import binaries as b

    found = {}
    with b.allow_jit(lambda key, kernel: found.setdefault(key, kernel)):
        want = run()
    kb = b.KernelBinaries(torch.device("cuda"))
    for key, kernel in found.items():
        spec, cubin = b.spec_from_compiled(key, kernel)
        tma = sum(t.startswith("nvTmaDesc:") for _, t in spec.arg_types)
        assert tma == descriptors, spec.arg_types
        kb.add(spec, cubin)
    out = poisoned(want.shape, want.dtype, "cuda")
    graph = torch.cuda.CUDAGraph()
    with launching_with(kb):
        run(out=out)  # eager, from the binary
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        out.fill_(float("nan"))
        with torch.cuda.graph(graph):
            run(out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
