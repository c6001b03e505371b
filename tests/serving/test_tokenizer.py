"""The artifact's tokenizer.json is read as the artifact's own file: never through a symbolic
link out of the folder, never a FIFO or an oversized file; `kernl serve` refuses such an
artifact before starting Ray."""

import os
import shutil
import subprocess
import sys

import pytest

from kernl.serving import tokenizer as tok
from kernl.serving.tokenizer import TokenizerFileError, load_tokenizer, read_tokenizer_file


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    dst = tmp_path / "copy.kernl"
    shutil.copytree(tiny_artifact, dst)
    return dst


def test_the_artifacts_own_tokenizer_encodes(artifact_copy):
    tokenize = load_tokenizer(artifact_copy)
    assert tokenize(["w0 w5"])[0]["input_ids"] == [2, 4, 9, 3]


def test_a_text_pair_encodes_as_hugging_faces_tokenizer_text_text_pair(artifact_copy):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(artifact_copy / "tokenizer.json"))
    pairs = [("w0 w5", "w7 w1 w2"), ("w3", "w3 w9")]
    got = load_tokenizer(artifact_copy)(pairs)
    want = hf([a for a, _ in pairs], [b for _, b in pairs], return_token_type_ids=True)
    for j, encoded in enumerate(got):
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            assert encoded[name] == want[name][j], name
    assert got[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_the_files_own_truncation_is_ignored_as_hugging_face_ignores_it(artifact_copy):
    """all-MiniLM-L6-v2's tokenizer.json was saved with truncation at 128 tokens (a
    512-position model): kernl serve cut every text there, silently, where HF's
    tokenizer(text) takes the file's truncation off and keeps the whole text."""
    from tokenizers import Tokenizer

    file = artifact_copy / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(file))
    tokenizer.enable_truncation(3)
    tokenizer.save(str(file))
    assert len(load_tokenizer(artifact_copy)(["w0 w5 w1 w2 w3"])[0]["input_ids"]) == 7


def test_a_home_relative_artifact_path_finds_its_tokenizer(artifact_copy, monkeypatch):
    """`kernl serve '~/bert.kernl'` (a Docker exec-form CMD passes the ~ unexpanded): load()
    expanded it, the tokenizer's path did not, and text requests were refused (422) as if
    the artifact carried none; /health named "<cwd>/~/bert.kernl" (review 2026-12-07)."""
    from kernl.serving.config import ServeConfig

    monkeypatch.setenv("HOME", str(artifact_copy.parent))
    tilde = f"~/{artifact_copy.name}"
    assert load_tokenizer(tilde)(["w0 w5"])[0]["input_ids"] == [2, 4, 9, 3]
    assert ServeConfig(artifact=tilde).artifact_path() == str(artifact_copy)  # /health


def test_no_tokenizer_file_means_ids_only(artifact_copy):
    os.remove(artifact_copy / "tokenizer.json")
    assert read_tokenizer_file(artifact_copy) is None and load_tokenizer(artifact_copy) is None


def test_a_link_out_of_the_folder_is_refused(artifact_copy, tmp_path):
    outside = tmp_path / "secret.json"
    os.replace(artifact_copy / "tokenizer.json", outside)
    os.symlink(outside, artifact_copy / "tokenizer.json")
    with pytest.raises(TokenizerFileError, match="symbolic link"):
        load_tokenizer(artifact_copy)
    # A link that stays inside the folder is refused too: the file must be the artifact's own.
    os.remove(artifact_copy / "tokenizer.json")
    os.replace(outside, artifact_copy / "real.json")
    os.symlink("real.json", artifact_copy / "tokenizer.json")
    with pytest.raises(TokenizerFileError, match="symbolic link"):
        read_tokenizer_file(artifact_copy)


def test_fifo_directory_and_oversized_files_are_refused(artifact_copy, monkeypatch):
    os.remove(artifact_copy / "tokenizer.json")
    os.mkfifo(artifact_copy / "tokenizer.json")  # opening it for reading would block forever
    with pytest.raises(TokenizerFileError, match="not a regular file"):
        read_tokenizer_file(artifact_copy)
    os.remove(artifact_copy / "tokenizer.json")
    os.mkdir(artifact_copy / "tokenizer.json")
    with pytest.raises(TokenizerFileError):
        read_tokenizer_file(artifact_copy)
    os.rmdir(artifact_copy / "tokenizer.json")
    (artifact_copy / "tokenizer.json").write_text("{}" + " " * 100)
    monkeypatch.setattr(tok, "MAX_TOKENIZER_BYTES", 64)
    with pytest.raises(TokenizerFileError, match="over the"):
        read_tokenizer_file(artifact_copy)


def test_a_malformed_tokenizer_is_a_clear_error(artifact_copy):
    (artifact_copy / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(TokenizerFileError, match="not UTF-8"):
        load_tokenizer(artifact_copy)
    (artifact_copy / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerFileError, match="tokenizer.json"):
        load_tokenizer(artifact_copy)


def test_serve_refuses_a_linked_tokenizer_before_ray_starts(artifact_copy, tmp_path):
    os.replace(artifact_copy / "tokenizer.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", artifact_copy / "tokenizer.json")
    result = subprocess.run(
        [sys.executable, "-m", "kernl.serving", str(artifact_copy)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["malformed tokenizer", "port", "cuda"])
def test_serve_refuses_what_cannot_start_before_ray_starts(artifact_copy, case):
    """Each of these started Ray and failed ~30-50 s later with a traceback of Ray's (the
    malformed tokenizer's cause only in Ray's logs), or, for a GPU that is not there, waited
    for a node forever, deaf to Ctrl-C."""
    args = [sys.executable, "-m", "kernl.serving", str(artifact_copy)]
    if case == "malformed tokenizer":
        (artifact_copy / "tokenizer.json").write_text('{"not": "a tokenizer"')
        needle = "tokenizer.json"
    elif case == "port":
        args += ["--port", "70000"]
        needle = "port must lie in [1, 65535]"
    else:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args += ["--device", "cuda"]
        needle = "no CUDA GPU"
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""}
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
