import pytest
from bench_utils import NORM_SHAPES, norm_case, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"{s[0]}-M{s[1]}-N{s[2]}")
def test_benchmark_norm(benchmark, implementation, shape):
    run_case(benchmark, norm_case(*shape), implementation)
