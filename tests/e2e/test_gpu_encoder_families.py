"""On a GPU: the encoder families kernl learned from their traced code (MPNet's relative
position bias on kernl.attention, DeBERTa-v3's positions computed at compile time, ModernBERT's
rotary embedding on kernl.rotary), base-sized
in fp16 and bf16, compiled and tuned for CUDA, loaded with graphs, against eager."""

import pytest
import torch
import transformers as T

import kernl.compiler
import kernl.runtime

FAMILIES = {
    # all-mpnet-base-v2's shape (the eager attention becomes kernl.attention with a full bias)
    "mpnet": lambda: T.MPNetModel(T.MPNetConfig(vocab_size=30527)),
    # deberta-v3-base's shape (relative positions folded to weights, attention on aten ops)
    "deberta-v3": lambda: T.DebertaV2Model(
        T.DebertaV2Config(
            vocab_size=128100,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=256,
            max_relative_positions=-1,
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            type_vocab_size=0,
        )
    ),
}
# ModernBERT-base's shape (rotary positions on kernl.rotary, sliding-window layers)
FAMILIES["modernbert"] = lambda: T.ModernBertModel(T.ModernBertConfig())
TOL = {"fp16": 2e-2, "bf16": 8e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_base_sized_family_on_cuda_matches_eager(name, dtype, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    kernl.compiler.compile(model, "batch=1,4 seq=32,128", tmp_path / "m", dtype=dtype,
                           device="cuda")  # fmt: skip
    served = kernl.runtime.load(tmp_path / "m", device="cuda")
    assert served._runners[served.buckets[0]].graph is not None  # captured at load
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = model.to(torch_dtype).cuda()
    for b, s in [(1, 32), (3, 100), (4, 128)]:
        ids = torch.randint(1000, 30000, (b, s), device="cuda")
        mask = torch.ones_like(ids)
        mask[-1, s // 2 :] = 0
        got = served(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        scale = ref[real].float().abs().max()
        err = (got[real].float() - ref[real].float()).abs().max() / scale
        assert err < TOL[dtype], f"{name} {dtype} {b}x{s}: relative error {err}"
