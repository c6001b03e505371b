import pytest
from bench_utils import rotary_case, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("L", [512, 4096])
def test_benchmark_rotary(benchmark, implementation, L):
    run_case(benchmark, rotary_case(4, L, 32, 8, 128), implementation)
