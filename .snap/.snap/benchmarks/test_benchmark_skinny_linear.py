import pytest
from bench_utils import run_case, skinny_linear_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "cublas"])
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize(
    "K,N",
    [(2048, 3072), (2048, 2048), (8192, 2048), (2048, 128256)],
    ids=["llama1b-qkv", "llama1b-o", "llama1b-down", "llama1b-lm-head"],
)
def test_benchmark_skinny_linear(benchmark, implementation, M, K, N):
    run_case(benchmark, skinny_linear_case(M, K, N), implementation)
