"""Device check of kernl.runtime.binaries: compile a small Triton kernel once, then launch it
from its cubin (eagerly and inside a CUDA graph) with Triton's compiler disabled."""

import torch
import triton
import triton.language as tl

from kernl.runtime import binaries


@triton.jit
def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(
        out_ptr + offs,
        tl.load(x_ptr + offs, mask=m) * alpha + tl.load(y_ptr + offs, mask=m),
        mask=m,
    )


scaled_add.fn.__module__ = "kernl.kernels.probe"  # dispatch only routes kernl's kernels


def launch(x, y, out):
    n = x.numel()
    scaled_add[(triton.cdiv(n, 1024),)](x, y, out, n, 0.5, BLOCK=1024, num_warps=4)


x, y = torch.randn(5000, device="cuda"), torch.randn(5000, device="cuda")
out = torch.empty_like(x)
found = {}
with binaries.allow_jit(lambda k, kern: found.setdefault(k, binaries.spec_from_compiled(k, kern))):
    launch(x, y, out)
print("recorded", list(found))
for spec, cubin in found.values():
    binaries.registry().add(spec, cubin, torch.device("cuda"))
    print(spec.function, spec.arg_types, spec.shared, spec.num_warps)


def no_compile(*a, **k):
    raise AssertionError("triton compiled at run time")


triton.compiler.compile = no_compile
import triton.runtime.jit as jit  # noqa: E402

jit.compile = no_compile
out.fill_(float("nan"))
launch(x, y, out)
torch.cuda.synchronize()
torch.testing.assert_close(out, x * 0.5 + y)
g = torch.cuda.CUDAGraph()
x2, y2, out2 = torch.randn_like(x), torch.randn_like(y), torch.full_like(x, float("nan"))
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    launch(x2, y2, out2)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    launch(x2, y2, out2)
x2.copy_(torch.randn_like(x2))
out2.fill_(float("nan"))
g.replay()
torch.cuda.synchronize()
torch.testing.assert_close(out2, x2 * 0.5 + y2)
print("PROBE OK: cubin launched eagerly and under graph replay with the compiler disabled")
