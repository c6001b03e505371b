"""LoRA (peft) on a generating model: kernl rebuilds the decoder from each linear's `.weight`,
which on a peft layer is its base weight, so unmerged adapters were dropped (in bf16 a small
one passed validation and kernl served the base model's ids). Refused by name unless merged
or disabled. peft is not a test dependency: its layer is imitated (the attributes kernl reads
are peft's BaseTunerLayer's)."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler
from kernl.compiler.tasks.generation_config import refuse_module_code_kernl_drops
from kernl.compiler.trace import UnsupportedModelError

from .tiny_models import tiny_model


class LoraLinear(torch.nn.Module):
    __module__ = "peft.tuners.lora.layer"

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, 2)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, base.out_features)})
        self.active_adapters = ["default"]
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x):
        out = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return out
        return out + self.lora_B["default"](self.lora_A["default"](x))


def _with_lora(family: str = "llama3") -> tuple[torch.nn.Module, list[LoraLinear]]:
    model = tiny_model(family)
    layers = []
    for layer in model.model.layers:
        layer.self_attn.q_proj = LoraLinear(layer.self_attn.q_proj)
        layers.append(layer.self_attn.q_proj)
    return model, layers


def test_unmerged_adapters_are_refused_before_the_compile(tmp_path):
    model, _ = _with_lora()
    with pytest.raises(
        UnsupportedModelError, match=r"peft adapters \(LoRA, DoRA, IA3...\) not merged.*q_proj"
    ):
        kernl.compiler.compile(
            model, "batch=1 prompt=8 cache=16", tmp_path / "a", dtype="fp32", device="cpu"
        )
    assert not (tmp_path / "a").exists()


def test_merged_or_disabled_adapters_are_not_refused():
    model, layers = _with_lora()
    for lora in layers:
        lora.merged_adapters = ["default"]
    refuse_module_code_kernl_drops(model, "causal-lm")
    for lora in layers:
        lora.merged_adapters, lora.disable_adapters = [], True
    refuse_module_code_kernl_drops(model, "causal-lm")
    layers[0].disable_adapters = False
    with pytest.raises(UnsupportedModelError, match="model.layers.0.self_attn.q_proj"):
        refuse_module_code_kernl_drops(model, "causal-lm")


def test_a_peft_wrapper_is_refused_naming_merge_and_unload():
    model, _ = _with_lora()
    # a PeftModelForCausalLM stand-in: its class lives in peft
    Wrapper = type("PeftModelForCausalLM", (torch.nn.Module,), {"__module__": "peft.peft_model"})
    peft_model = Wrapper()
    peft_model.base_model = model
    with pytest.raises(UnsupportedModelError, match="merge_and_unload"):
        refuse_module_code_kernl_drops(peft_model, "causal-lm")


def test_a_layer_holding_only_inactive_adapters_is_not_refused():
    """peft reports the model-wide active adapter on every layer, also on one that holds only
    another (inert) adapter."""
    model, layers = _with_lora()
    for lora in layers:
        lora.active_adapters = ["b"]
        lora._get_available_adapters = lambda: {"default"}
    refuse_module_code_kernl_drops(model, "causal-lm")


def test_peft_wrappers_are_refused_before_the_buckets_are_read(tmp_path):
    """compile() read a causal LM's buckets against the task a task-less PeftModel guessed
    ("unknown axis 'prompt' for an encoder"); a PeftModelForSeq2SeqLM was taken for a head
    kernl has no task for."""
    from kernl.compiler.trace import task_of

    model, _ = _with_lora()
    for name in ("PeftModel", "PeftMixedModel"):
        wrapper = type(name, (torch.nn.Module,), {"__module__": "peft.peft_model"})()
        wrapper.base_model, wrapper.config = model, model.config
        with pytest.raises(UnsupportedModelError, match=f"peft {name}.*merge_and_unload"):
            kernl.compiler.compile(
                wrapper, "batch=1 prompt=8 cache=16", tmp_path / "a", dtype="fp32", device="cpu"
            )
    seq2seq = type("PeftModelForSeq2SeqLM", (torch.nn.Module,), {"__module__": "peft.peft_model"})
    assert task_of(model.config, seq2seq()) == "seq2seq-lm"
