"""The tuner's tanh-GELU candidate for an erf-GELU linear (cuBLASLt's bias+GELU epilogue):
offered only where its error stays within 2x stock PyTorch's (STYLE rule 6)."""

import pytest
import torch

from kernl.compiler.tune import gelu_tanh_error
from kernl.runtime.kernl_ops import linear


def ffn_up(dtype, device="cpu", m=256):
    """BERT-base's FFN up-projection at initialisation scale (weights N(0, 0.02))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 768, generator=g)
    w = torch.randn(3072, 768, generator=g) * 0.02
    b = torch.randn(3072, generator=g) * 0.02
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def test_fp32_refuses_the_approximation():
    err, stock = gelu_tanh_error(linear, ffn_up(torch.float32), {"activation": "gelu"})
    assert err > 2 * stock  # ~5e-4 vs ~1e-6: tanh-GELU is visible in fp32
    assert 1e-4 < err < 1e-3


def test_fp16_rounding_hides_the_approximation():
    err, stock = gelu_tanh_error(linear, ffn_up(torch.float16), {"activation": "gelu"})
    assert err <= 2 * stock, (err, stock)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [16, 4096])
def test_gpu_cublaslt_candidate_is_accepted_in_fp16_only(m):
    for dtype, accepted in ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False)):
        err, stock = gelu_tanh_error(linear, ffn_up(dtype, "cuda", m), {"activation": "gelu"})
        assert (err <= 2 * stock) == accepted, (dtype, m, err, stock)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tuned_bert_keeps_its_gelu_fused_and_validates(tmp_path, monkeypatch):
    """On the GPU the FFN GELU ends in an epilogue, whichever GEMM wins: Triton's (erf) or
    cuBLASLt's (tanh, recorded as an approximation); the program still matches eager."""
    from transformers import BertConfig, BertModel

    from kernl.artifacts.schema import Bucket
    from kernl.compiler.launch_counts import count_launches
    from kernl.compiler.lower import lower
    from kernl.compiler.passes import rewrite
    from kernl.compiler.trace import FlatModel, example_inputs, export_bucket, model_signature
    from kernl.compiler.tune import tune_program
    from kernl.compiler.validate import validate
    from kernl.runtime.binaries import allow_jit

    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=2)).half().to(dev).eval()
    sig = model_signature(model, dev)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    bucket = Bucket(32, 128)
    program, weights = lower(export_bucket(flat, bucket, 30522, dev), bucket, flat.input_names)
    program = rewrite(program, weights)
    example = dict(zip(flat.input_names, example_inputs(flat.input_names, bucket, 30522, dev)))
    records = tune_program(program, weights, example, dev)
    ffn = [
        i
        for i in program.instructions
        if i.op == "kernl.linear" and i.kwargs["activation"] in ("gelu", "gelu_tanh")
    ]
    assert len(ffn) == 2
    for ins in ffn:
        assert ins.kwargs["impl"] == "triton" or ins.kwargs["activation"] == "gelu_tanh"
    approximated = [r for r in records if r.approximation]
    assert len(approximated) == sum(i.kwargs["activation"] == "gelu_tanh" for i in ffn)
    counts = count_launches(program)
    assert "aten.gelu" not in counts.by_source and "aten.clone" not in counts.by_source
    with allow_jit():
        result = validate(flat, program, weights, dev, 2e-2, 2e-2)
    assert result.max_abs_error < 2e-2
