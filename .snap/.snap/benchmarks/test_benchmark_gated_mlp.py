import pytest
from bench_utils import gated_mlp_case, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "cublas"])
@pytest.mark.parametrize("M", [512, 4096])
def test_benchmark_gated_mlp(benchmark, implementation, M):
    run_case(benchmark, gated_mlp_case(M, 4096, 11008), implementation)
