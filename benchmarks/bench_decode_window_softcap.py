"""Decode attention with a sliding window (Mistral-7B's shapes) and with Gemma2's softcap
(Gemma2-9B's shapes), bf16, one GPU, against what the decoder ran before each existed.

    python benchmarks/bench_decode_window_softcap.py     # JSON to $OUT/bench_decode_window_softcap.json

Window (32 heads, 8 KV heads of 128, window 4096, every row's query at the cache's last slot):
  kernl-window   kernl's decode attention given the window: the chunks before it read nothing
  kernl-mask     the same kernel given only the windowed slot mask (reads the whole cache)
  sdpa-mask      SDPA with the windowed slot mask
Softcap (16 heads, 8 KV heads of 256, cap 50, scale 256 ** -0.5, as Gemma2-9B):
  kernl-softcap  kernl's decode attention with HAS_SOFTCAP
  torch-softcap  the decoder's torch path for Gemma2: bmm, scale, tanh cap, mask bias, float32
                 softmax, bmm
Each variant is checked once against a float64 reference, then timed: median of the replays
of a CUDA graph of 20 calls between CUDA events, per call (decode_tiles.graph_ms; the
forty-first session's figures took 7 replays by the script's own copy of it). A plain script, not collected by pytest;
well under a minute."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernl.compiler.tasks.causal_lm.decode_tiles import graph_ms  # noqa: E402
from kernl.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

DTYPE, DEV = torch.bfloat16, "cuda"


def per_call_ms(fn) -> float:
    """Median ms of one call from replays of a CUDA graph of 20 calls, timed as the compiler
    times decode tiles (decode_tiles.graph_ms): no host launch cost in the figure."""
    return round(graph_ms([fn] * 20, torch.device(DEV)), 4)


def checked(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-2, (name, err)


def window_case(batch: int, slots: int, window: int = 4096) -> dict:
    h, kvh, d = 32, 8, 128
    q = torch.randn(batch, h, 1, d, device=DEV, dtype=DTYPE)
    k = torch.randn(batch, kvh, slots, d, device=DEV, dtype=DTYPE)
    v = torch.randn(batch, kvh, slots, d, device=DEV, dtype=DTYPE)
    lens = torch.full((batch,), slots, device=DEV, dtype=torch.int64)
    mask = (torch.arange(slots, device=DEV) + window > slots - 1).expand(batch, slots).contiguous()
    ref = decode_attention_reference(q.double(), k.double(), v.double(), kv_lens=lens, kv_mask=mask)
    variants = {
        "kernl-window": lambda: decode_attention(
            q, k, v, kv_lens=lens, kv_mask=mask, window=window
        ),
        "kernl-mask": lambda: decode_attention(q, k, v, kv_lens=lens, kv_mask=mask),
        "sdpa-mask": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True
        ),
    }
    row = {}
    for name, fn in variants.items():
        checked(name, fn(), ref)
        row[name] = per_call_ms(fn)
    return row


def softcap_case(batch: int, slots: int, cap: float = 50.0) -> dict:
    h, kvh, d = 16, 8, 256
    scale = 256**-0.5
    q = torch.randn(batch, h, 1, d, device=DEV, dtype=DTYPE)
    k = torch.randn(batch, kvh, slots, d, device=DEV, dtype=DTYPE)
    v = torch.randn(batch, kvh, slots, d, device=DEV, dtype=DTYPE)
    lens = torch.full((batch,), slots, device=DEV, dtype=torch.int64)
    mask = torch.ones(batch, slots, device=DEV, dtype=torch.bool)
    kw = dict(sm_scale=scale, kv_lens=lens, kv_mask=mask, softcap=cap)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), **kw)
    bias = torch.where(mask, 0.0, torch.finfo(DTYPE).min).to(DTYPE)
    bias = bias[:, None, None, :].expand(batch, kvh, 1, slots).reshape(batch * kvh, 1, slots)
    g = h // kvh

    def torch_softcap():  # runtime/generation/decoder.py's torch path with a softcap
        keys_t = k.reshape(batch * kvh, slots, d).transpose(1, 2)
        scores = torch.bmm(q.reshape(batch * kvh, g, d), keys_t) * scale
        scores = torch.tanh(scores / cap) * cap + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(DTYPE)
        return torch.bmm(probs, v.reshape(batch * kvh, slots, d)).reshape(batch, h, 1, d)

    variants = {
        "kernl-softcap": lambda: decode_attention(q, k, v, **kw),
        "torch-softcap": torch_softcap,
    }
    row = {}
    for name, fn in variants.items():
        checked(name, fn(), ref)
        row[name] = per_call_ms(fn)
    return row


def main() -> None:
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "window": {},
        "softcap": {},
    }
    for batch in (1, 8):
        for slots in (32768,):
            row = window_case(batch, slots)
            result["window"][f"{batch}x{slots}"] = row
            print("window", batch, slots, json.dumps(row), flush=True)
        for slots in (4096,):
            row = softcap_case(batch, slots)
            result["softcap"][f"{batch}x{slots}"] = row
            print("softcap", batch, slots, json.dumps(row), flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_decode_window_softcap.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
