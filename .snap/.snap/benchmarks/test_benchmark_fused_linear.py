import pytest
from bench_utils import LINEAR_SHAPES, linear_case, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "cublas"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}-{s[3]}")
def test_benchmark_fused_linear(benchmark, implementation, shape):
    run_case(benchmark, linear_case(*shape), implementation)
