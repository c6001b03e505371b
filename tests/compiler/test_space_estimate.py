"""The free-space check made before the model is loaded: it counts the checkpoint's weights
once, at the size the compile's dtype gives them (+20%). It counted every *.safetensors and
*.bin in the folder at their size on disk, so a folder holding both formats, or an fp32
checkpoint compiled to fp16, was refused on a disk it fits on (review)."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file

import kernl.compiler
from kernl.artifacts import verify_artifact
from kernl.compiler.tasks.encoder import _model_bytes

WEIGHTS = {"w": torch.zeros(1000, 100), "ids": torch.zeros(1, 512, dtype=torch.int64)}
FLOAT_BYTES = 1000 * 100 * 4  # at fp32
INT_BYTES = 512 * 8  # position ids: their size whatever the dtype


def _checkpoint(folder, dtype=torch.float32, safetensors=True, bins=(), config_dtype=None):
    folder.mkdir()
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in WEIGHTS.items()}
    if safetensors:
        save_file(weights, str(folder / "model.safetensors"))
    for name in bins:
        torch.save(weights, folder / name)
    config = {"model_type": "bert"}
    if config_dtype:
        config["torch_dtype"] = config_dtype
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "target, expected",
    [(torch.float32, FLOAT_BYTES + INT_BYTES), (torch.float16, FLOAT_BYTES // 2 + INT_BYTES)],
    ids=["fp32", "fp16"],
)
def test_safetensors_are_counted_once_at_the_compile_dtype(tmp_path, target, expected):
    folder = _checkpoint(
        tmp_path / "m", bins=["pytorch_model.bin", "training_args.bin"], config_dtype="float32"
    )
    assert _model_bytes(folder, target) == int(expected * 1.2)


def test_a_half_precision_checkpoint_compiled_to_fp32_counts_double(tmp_path):
    folder = _checkpoint(tmp_path / "m", dtype=torch.float16)
    assert _model_bytes(folder, torch.float32) == int((FLOAT_BYTES + INT_BYTES) * 1.2)


def test_without_safetensors_only_the_weight_bins_count_scaled_from_the_config(tmp_path):
    folder = _checkpoint(
        tmp_path / "m",
        safetensors=False,
        bins=["pytorch_model.bin", "training_args.bin"],
        config_dtype="float32",
    )
    on_disk = (folder / "pytorch_model.bin").stat().st_size
    assert _model_bytes(folder, torch.float16) == int(on_disk * 2 / 4 * 1.2)
    assert _model_bytes(folder, torch.float32) == int(on_disk * 1.2)
    (folder / "config.json").write_text("{}")  # no torch_dtype: taken as fp32
    assert _model_bytes(folder, torch.float16) == int(on_disk * 2 / 4 * 1.2)


def test_a_module_counts_its_floating_parameters_at_the_compile_dtype():
    model = torch.nn.Linear(100, 10)  # 1010 parameters
    assert _model_bytes(model, torch.float16) == int(1010 * 2 * 1.2)


def test_an_unreadable_safetensors_header_counts_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\xff" * 4096)
    assert _model_bytes(folder, torch.float16) == int(4096 * 1.2)


def test_an_fp32_checkpoint_compiled_to_fp16_fits_where_its_files_would_not(tmp_path, monkeypatch):
    """The review's repro, with the free space made up: a 19 MB fp32 checkpoint, with its
    pytorch_model.bin beside it (38 MB of files), compiled to fp16 (10 MB) with 24 MiB free:
    refused before loading ("needs about 44 MiB"), it compiles."""
    import transformers as T

    torch.manual_seed(0)
    config = T.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=150_000,  # 19 MB of fp32 embeddings
        max_position_embeddings=16,
    )
    model_dir = tmp_path / "m"
    model = T.BertModel(config)
    model.save_pretrained(model_dir)  # model.safetensors
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _p: Usage(1 << 40, 0, 24 << 20))
    out = tmp_path / "out.kernl"
    kernl.compiler.compile(
        model_dir, "batch=1 seq=8", out, dtype="fp16", device="cpu", kernels=False
    )
    assert verify_artifact(out).dtype == "float16"
