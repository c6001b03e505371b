"""The pipelined weights reader (`kernl.artifacts.weights`) gives what safetensors' own
`load_file` gives, tensor for tensor and bit for bit, whatever the dtypes, the odd sizes that
leave the next tensor unaligned in the file and the chunks a tensor spans; each weight has a
storage of its own. The chunk size is lowered so a small file spans many chunks and more
chunks than staging slots."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernl.artifacts import ArtifactCorruptError, opened, read_weights
from kernl.artifacts import weights as weights_module
from kernl.artifacts.reader import check_safetensors_header
from kernl.artifacts.weights import read_tensors

CPU = torch.device("cpu")


def _odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bias": torch.randn(3, generator=g).half(),  # 6 bytes: what follows is unaligned
        "b.flag": torch.tensor([True, False, True]),
        "c.weight": torch.randn(37, 29, generator=g),
        "d.ids": torch.arange(-5, 6, dtype=torch.int64).reshape(1, 11),
        "e.bytes": torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
        "f.scalar": torch.tensor(2.5, dtype=torch.float64),
        "g.empty": torch.empty(0, 4, dtype=torch.float16),
        "h.bf16": torch.randn(64, 33, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file(_odd_tensors(), str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("preadv", [True, False], ids=["preadv", "pread"])
@pytest.mark.parametrize("chunk", [5, 64, 1000, 1 << 20])
def test_reads_every_tensor_bit_for_bit_like_safetensors(weights_file, monkeypatch, chunk, preadv):
    monkeypatch.setattr(weights_module, "CHUNK_BYTES", chunk)
    if not preadv:  # a platform without it (macOS's Python): pread and a copy
        monkeypatch.setattr(opened, "_PREADV", None)
    expected = load_file(str(weights_file))
    got = read_tensors(weights_file, check_safetensors_header(weights_file), "cpu")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert (have.dtype, have.shape) == (want.dtype, want.shape), name
        assert have.is_contiguous()
        assert torch.equal(have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    storages = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(storages) == sum(1 for t in got.values() if t.numel())


def test_read_weights_reads_an_artifact_folder(weights_file, monkeypatch):
    monkeypatch.setattr(weights_module, "CHUNK_BYTES", 16)
    got = read_weights(weights_file.parent, device="cpu")
    assert torch.equal(got["c.weight"], _odd_tensors()["c.weight"])


def test_a_file_cut_after_its_header_was_checked_is_an_error(weights_file, monkeypatch):
    monkeypatch.setattr(weights_module, "CHUNK_BYTES", 50)
    header = check_safetensors_header(weights_file)
    data = weights_file.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    weights_file.write_bytes(data[:-40])
    tensors = weights_module.layout(header)
    out = [torch.empty(t.end - t.start, dtype=torch.uint8) for t in tensors]
    fd = os.open(weights_file, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ended at byte"):
            # the data size the header implies, not the file's: the reader must not return garbage
            weights_module._stream(fd, 8 + hlen, len(data) - 8 - hlen, tensors, out, CPU)
    finally:
        os.close(fd)


def test_a_corrupt_header_is_refused_before_reading(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    data = bytearray(path.read_bytes())
    data[8:9] = b"["  # the header is no longer a JSON map
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError):
        read_weights(tmp_path, device="cpu")


@pytest.mark.gpu
def test_reads_to_the_gpu_like_safetensors(weights_file, monkeypatch):
    monkeypatch.setattr(weights_module, "CHUNK_BYTES", 64)  # many chunks, every slot reused
    expected = load_file(str(weights_file), device="cuda")
    got = read_weights(weights_file.parent, device="cuda")
    for name, want in expected.items():
        assert got[name].device.type == "cuda"
        assert got[name].data_ptr() % 16 == 0  # kernel binaries assume aligned pointers
        assert torch.equal(
            got[name].cpu().reshape(-1).view(torch.uint8), want.cpu().reshape(-1).view(torch.uint8)
        )


def _file_with_header_of(path: Path, length: int) -> None:
    """A safetensors file whose header is `length` bytes, by padding its metadata."""
    for pad in range(length):
        save_file({"w": torch.ones(3)}, str(path), metadata={"pad": "x" * pad})
        (hlen,) = struct.unpack("<Q", path.read_bytes()[:8])
        if hlen == length:
            return
    raise AssertionError(f"no padding gives a header of {length} bytes")


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])
def test_a_header_length_that_begins_like_a_pickle_is_read(tmp_path, length):
    # 640 is 0x280: the length's first two bytes (little-endian) are 80 02, a pickle's
    # protocol-2 marker. A tiny model's weights hit this (vocabulary 7590 made 1408 = 0x580):
    # kernl-compile refused its own artifact as a pickle.
    path = tmp_path / "weights.safetensors"
    _file_with_header_of(path, length)
    assert path.read_bytes()[:2] == bytes([0x80, length >> 8])
    header = check_safetensors_header(path)
    assert torch.equal(read_tensors(path, header, "cpu")["w"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:300])  # an interrupted copy: damaged, not a pickle
    with pytest.raises(ArtifactCorruptError, match="header length"):
        check_safetensors_header(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_pickle_in_place_of_the_weights_is_still_named(tmp_path, protocol):
    import pickle

    from kernl.artifacts import ArtifactUnsafeError

    path = tmp_path / "weights.safetensors"
    path.write_bytes(pickle.dumps({"w": list(range(300))}, protocol=protocol))
    with pytest.raises(ArtifactUnsafeError, match="pickle"):
        check_safetensors_header(path)
