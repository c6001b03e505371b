import pytest
from bench_utils import DECODE_SHAPES, decode_case, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "sdpa"])
@pytest.mark.parametrize("kv_len", DECODE_SHAPES)
def test_benchmark_decode_attention(benchmark, implementation, kv_len):
    run_case(benchmark, decode_case(kv_len), implementation)
