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


def _tiny_bert_program():
    from transformers import BertConfig, BertModel

    from kernl.artifacts.schema import Bucket
    from kernl.compiler.lower import lower
    from kernl.compiler.passes import rewrite
    from kernl.compiler.trace import FlatModel, example_inputs, export_bucket, model_signature

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(cfg).eval()
    dev = torch.device("cpu")
    sig = model_signature(model, dev)
    flat = FlatModel(model, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    bucket = Bucket(1, 16)
    program, weights = lower(export_bucket(flat, bucket, 100, dev), bucket, flat.input_names)
    weights = dict(weights)
    program = rewrite(program, weights)
    example = dict(zip(flat.input_names, example_inputs(flat.input_names, bucket, 100, dev)))
    return program, weights, example


def test_the_tanh_gelu_is_timed_on_the_pingpong_configs_and_can_win(monkeypatch, tmp_path):
    """Where the tuner accepts a tanh GELU, the ping-pong configs are also timed with it (on
    the CPU, GPU timing faked: a ping-pong config with the tanh GELU is the fastest), and the
    winner is recorded as a Triton config with the activation changed and the approximation
    said; the other configs are timed with the erf GELU only."""
    from kernl.compiler import tune
    from kernl.runtime import kernl_ops

    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KERNL_COMPILE_THREADS", "0")
    monkeypatch.setattr(tune, "_timing_target", lambda device: "fake-gpu")
    # every candidate computes with aten, the chosen ones too when the program runs on
    monkeypatch.setattr(tune, "_kernel_available", lambda op, device: True)
    monkeypatch.setattr(kernl_ops, "triton_usable", lambda device, module: False)
    monkeypatch.setattr(tune, "gelu_tanh_error", lambda fn, args, kwargs: (1e-3, 1e-3))
    plain, pingpong = {"name": "plain"}, {"name": "pp", "pingpong": True}
    monkeypatch.setattr(tune, "_configs", lambda op, *call: [dict(plain), dict(pingpong)])
    timed, last = [], {}
    real = tune.kernl_ops_fn

    def fake_fn(op):
        fn = real(op)

        def run(*args, **kwargs):
            last.clear()
            last.update(op=op, **kwargs)
            return fn(*args, **{**kwargs, "impl": "aten", "config": None})

        return run

    def fake_bench(fn):
        fn()
        key = (last["op"], last.get("impl"), (last.get("config") or {}).get("name"))
        timed.append((*key, last.get("activation")))
        fast = key[2] == "pp" and last.get("activation") == "gelu_tanh"
        return 1.0 if fast else 10.0

    monkeypatch.setattr(tune, "kernl_ops_fn", fake_fn)
    monkeypatch.setattr(tune, "_bench_us", fake_bench)
    program, weights, example = _tiny_bert_program()
    records = tune.tune_program(program, weights, example, torch.device("cpu"))
    ffn = [r for r in records if r.op == "kernl.linear" and r.approximation]
    assert len(ffn) == 1 and ffn[0].impl == "triton" and ffn[0].config == pingpong
    assert ffn[0].approximation.startswith("gelu as gelu_tanh")
    ins = program.instructions[ffn[0].index]
    assert ins.kwargs["activation"] == "gelu_tanh" and dict(ins.kwargs["config"]) == pingpong
    gelu_timings = [t for t in timed if t[3] in ("gelu", "gelu_tanh")]
    assert ("kernl.linear", "triton", "plain", "gelu") in gelu_timings
    assert ("kernl.linear", "triton", "plain", "gelu_tanh") not in gelu_timings
    assert ("kernl.linear", "triton", "pp", "gelu") in gelu_timings
    # every other linear: no tanh candidate, the ping-pong config with its own activation
    others = [r for r in records if r.op == "kernl.linear" and not r.approximation]
    assert others and all(r.config != pingpong or r.impl == "triton" for r in others)


def test_pingpong_configs_join_at_large_m_and_n_without_residual(monkeypatch):
    from kernl.kernels import fused_linear

    monkeypatch.setattr(fused_linear, "wgmma_linear_refusal", lambda x, w: None)

    def pingpongs(m, n, residual=False):
        x = torch.empty(m, 768, device="meta")
        w = torch.empty(n, 768, device="meta")
        r = torch.empty(m, n, device="meta") if residual else None
        return [c for c in fused_linear.linear_configs(x, w, r) if c.pingpong]

    assert len(pingpongs(4096, 3072)) == 2 * len(fused_linear.PINGPONG_CONFIGS)
    assert not pingpongs(1024, 3072) and not pingpongs(4096, 768)
    assert not pingpongs(4096, 3072, residual=True)
    assert not [c for c in fused_linear.linear_configs() if c.pingpong]


def test_pingpong_configs_stay_out_where_the_kernel_cannot_run():
    from kernl.kernels import fused_linear

    x, w = torch.empty(4096, 768, dtype=torch.float16), torch.empty(3072, 768, dtype=torch.float16)
    assert not [c for c in fused_linear.linear_configs(x, w) if c.pingpong]  # CPU tensors
