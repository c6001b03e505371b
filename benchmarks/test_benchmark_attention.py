import pytest
from bench_utils import ATTENTION_SHAPES, attention_case, encoder_attention_case, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl", "sdpa"])
@pytest.mark.parametrize(
    "shape", ATTENTION_SHAPES, ids=lambda s: f"hd{s[0]}-L{s[1]}-{'causal' if s[2] else 'full'}"
)
def test_benchmark_attention(benchmark, implementation, shape):
    run_case(benchmark, attention_case(*shape), implementation)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["kernl_flash", "kernl_short", "sdpa"])
@pytest.mark.parametrize("shape", [(8, 128), (32, 128), (32, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_benchmark_encoder_attention(benchmark, implementation, shape):
    run_case(benchmark, encoder_attention_case(*shape), implementation)
