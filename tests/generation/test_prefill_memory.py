"""The load-time memory plan's activation pool (`generation_memory`) against what a prefill
holds at its peak, measured op by op: every tensor an op makes, each storage once, while
alive (the weights, cache and inputs left out). A plan under the peak lets `load()` accept an
artifact whose graph capture then runs out of memory; one charging [B, heads, S, S] scores the
prefill never makes refused a Mistral-7B at a 32k prompt on an 80 GB GPU."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernl.artifacts.generation import (
    DecodeKernels,
    GenerationBuckets,
    GenerationDescription,
    generation_memory,
)
from kernl.compiler.tasks.causal_lm.describe import describe
from kernl.runtime.generation.decoder import Decoder, KVCache

from .tiny_models import tiny_model


class LiveBytes(TorchDispatchMode):
    """The most bytes of op-made tensors alive at once (each storage counted once)."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.alive, self.peak = ignore, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.ignore:
                    refs, n = self.alive.setdefault(key, ([], storage.nbytes()))
                    refs.append(weakref.ref(t))
        live = 0
        for key, (refs, n) in list(self.alive.items()):
            refs[:] = [r for r in refs if r() is not None]
            if refs:
                live += n
            else:
                del self.alive[key]
        self.peak = max(self.peak, live)
        return out


def _llama_shaped():
    """Llama-3-8B's proportions (intermediate 3.5x hidden, 4 query heads a KV head), where the
    gated MLP's intermediates outweigh the attention's: the tiny test models' do not."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=97, hidden_size=256, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=896, max_position_embeddings=512,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "family, batch, prompt",
    [("llama3", 4, 48), ("llama3", 1, 160), ("mistral_window", 3, 64), ("gemma2", 2, 96),
     ("gpt2", 3, 64), ("llama_shaped", 4, 64), ("llama_shaped", 1, 256)],
)  # fmt: skip
def test_the_plan_covers_the_prefill_peak_without_charging_scores(family, batch, prompt):
    hf = _llama_shaped() if family == "llama_shaped" else tiny_model(family)
    spec, weights = describe(hf, prompt, torch.float32)
    cpu = torch.device("cpu")
    decoder = Decoder(spec, weights, prompt, torch.float32, cpu)
    cache = KVCache.allocate(spec, batch, prompt, torch.float32, cpu)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, spec.vocab_size, (batch, prompt), generator=g)
    valid = torch.ones(batch, prompt, dtype=torch.bool)
    valid[1:, : prompt // 3] = False  # left padding
    ignore = {t.untyped_storage().data_ptr() for t in weights.values()}
    ignore |= {t.untyped_storage().data_ptr() for t in (cache.k, cache.v, ids, valid)}
    ignore |= {t.untyped_storage().data_ptr() for t in vars(decoder).values() if torch.is_tensor(t)}
    with torch.no_grad():
        decoder.prefill(cache, ids, valid)  # anything made once, made
        with LiveBytes(ignore) as seen:
            decoder.prefill(cache, ids, valid)
    buckets = GenerationBuckets([batch], [prompt], [prompt])
    _, pool = generation_memory(GenerationDescription(spec, buckets, DecodeKernels()), 4)
    scores = batch * spec.num_heads * prompt * prompt * 4
    assert seen.peak <= pool, (seen.peak, pool)
    assert pool < 2 * seen.peak + scores // 4, (seen.peak, pool, scores)
