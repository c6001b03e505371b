"""Attention merged back into one row per token with `transpose(1, 2).contiguous().view(...)`
(ModernBERT's SDPA path in transformers 5.0). torch.export drops the `.contiguous()` where
SDPA's traced output was already laid out [B, L, H, D] (the CPU's flash kernel), so the
`view` relied on strides kernl.attention does not promise: the compile failed on its own
artifact ("view size is not compatible with input tensor's size and stride")."""

import torch
import torch.nn.functional as F
import transformers as T
from transformers.modeling_outputs import BaseModelOutput

import kernl.compiler
import kernl.runtime
from kernl.artifacts.reader import read_program


class MergeHeadsByView(torch.nn.Module):
    """One attention layer whose heads merge through `.contiguous().view()`."""

    def __init__(self):
        super().__init__()
        self.config = T.BertConfig(
            vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1
        )
        self.heads, self.dim = 4, 32
        self.embed = torch.nn.Embedding(64, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, input_ids, attention_mask=None, return_dict=True):
        x = self.embed(input_ids)
        bs, seq = input_ids.shape
        qkv = self.qkv(x).view(bs, seq, 3, self.heads, self.dim // self.heads)
        q, k, v = qkv.transpose(3, 1).unbind(dim=2)  # [B, H, L, D] each
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        att = att.transpose(1, 2).contiguous().view(bs, -1, self.dim)
        return BaseModelOutput(last_hidden_state=self.out(att) + x)


def test_heads_merged_by_a_view_after_attention_compile_and_match_eager(tmp_path):
    torch.manual_seed(0)
    model = MergeHeadsByView().eval()
    artifact = tmp_path / "merge.kernl"
    kernl.compiler.compile(model, "batch=1,2 seq=8,16", artifact, dtype="fp32", device="cpu")
    for rel in (artifact / "programs").iterdir():
        ops = [i.op for i in read_program(artifact, f"programs/{rel.name}").instructions]
        assert ops.count("kernl.attention") == 1, (rel.name, ops)  # SDPA was rewritten
        # the heads merge is a reshape (a view of the kernel's [B, L, H, D] output, else a
        # copy); the split of the linear's output, contiguous whatever runs it, stays a view
        assert ops.count("aten.reshape.default") == 1, (rel.name, ops)
        assert ops.count("aten.view.default") == 1, (rel.name, ops)
    compiled = kernl.runtime.load(artifact, device="cpu")
    g = torch.Generator().manual_seed(1)
    for bs, seq in [(1, 8), (2, 16), (2, 11)]:
        ids = torch.randint(0, 64, (bs, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2 :] = 0
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        err = (got[real] - want[real]).abs().max().item()
        assert err < 1e-4, f"{bs}x{seq}: max |error| {err}"
