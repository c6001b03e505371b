"""`kernl inspect` on a tiny BERT compiled in CPU mode: the report shows what the artifact
really holds (manifest fields, per-bucket errors, op counts, kernel choices, file sizes)."""

import dataclasses
import json
import os
from collections import Counter

import pytest
import torch
import transformers as T
from click.testing import CliRunner

import kernl.compiler
from kernl.artifacts import read_manifest, read_program
from kernl.compiler.cli import main
from kernl.compiler.inspect_report import inspect_artifact, render_text

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(**SMALL, num_labels=3)).save_pretrained(
        root / "model"
    )
    out = root / "cls.kernl"
    kernl.compiler.compile(str(root / "model"), "batch=1,2 seq=8", out, dtype="fp32", device="cpu")
    return out


def _disk_sizes(root):
    return {
        os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
    }


def test_json_report_matches_the_artifact(artifact):
    result = CliRunner().invoke(main, ["inspect", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    manifest = read_manifest(artifact)
    assert report["model_type"] == "bert" and report["task"] == "sequence-classification"
    assert report["architectures"] == ["BertForSequenceClassification"]
    assert report["dtype"] == "float32" and report["target"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__
    assert report["model_source"] == str(artifact.parent / "model")
    assert [b["name"] for b in report["buckets"]] == ["1x8", "2x8"]
    for b, entry in zip(report["buckets"], manifest.buckets):
        program = read_program(artifact, entry.program)
        assert b["max_abs_error"] == entry.max_abs_error
        assert 0 <= b["max_abs_error"] < 1e-4
        assert b["op_counts"] == dict(Counter(i.op for i in program.instructions))
        assert sum(b["op_counts"].values()) == b["instructions"] == len(program.instructions)
        kernl_ops = [i for i in program.instructions if i.op.startswith("kernl.")]
        assert kernl_ops, "the rewrite passes put kernl ops into a BERT program"
        assert sum(c["count"] for c in b["kernel_choices"]) == len(kernl_ops)
        assert {c["op"] for c in b["kernel_choices"]} == {i.op for i in kernl_ops}
    disk = _disk_sizes(artifact)
    assert report["file_bytes"] == disk
    assert report["total_bytes"] == sum(disk.values())
    assert report["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}


def test_a_home_relative_path_reads_the_artifacts_files(artifact, monkeypatch):
    """`kernl inspect '~/cls.kernl'` read the manifest (its reader expands ~) and reported
    every program and file as missing (review 2026-12-07)."""
    from kernl.compiler.inspect_report import inspect_artifact

    monkeypatch.setenv("HOME", str(artifact.parent))
    report = inspect_artifact(f"~/{artifact.name}")
    assert report.file_bytes == inspect_artifact(artifact).file_bytes
    assert all(size is not None for size in report.file_bytes.values())


def test_text_report_is_readable(artifact):
    result = CliRunner().invoke(main, ["inspect", str(artifact)])
    assert result.exit_code == 0, result.output
    text = result.output
    manifest = read_manifest(artifact)
    for needle in (
        "bert (BertForSequenceClassification)",
        "sequence-classification",
        "float32",
        "built for   cpu",
        "weights.safetensors",
        "ops per program:",
        "kernl ops and chosen implementations:",
        "kernl.bert_embeddings",
    ):
        assert needle in text, needle
    for entry in manifest.buckets:
        row = [ln for ln in text.splitlines() if ln.split()[:1] == [f"{entry.bucket.batch}x8"]]
        assert row and f"{entry.max_abs_error:.3g}" in row[0]
    weights = os.path.getsize(artifact / "weights.safetensors")
    assert f"{weights / 1024:.1f} KiB" in text


def test_kernel_binaries_and_program_meta_are_shown_when_present(artifact):
    report = inspect_artifact(artifact)
    kernel = {
        "name": "k0123",
        "function": "fused_linear_kernel",
        "num_warps": 4,
        "shared_mem": 49152,
        "file": "kernels/k0123.cubin",
        "bytes": 20480,
        "meta": {"num_ctas": 1},
    }
    bucket = dataclasses.replace(report.buckets[0], meta={"tuned_on": "NVIDIA H100"})
    text = render_text(dataclasses.replace(report, kernels=[kernel], buckets=[bucket]))
    assert "kernel binaries (1):" in text
    line = next(ln for ln in text.splitlines() if "k0123" in ln)
    assert "fused_linear_kernel" in line and "warps=4" in line and "shared=49152" in line
    assert "program meta: tuned_on=NVIDIA H100" in text
    assert "kernel binaries: none" in render_text(report)


def _column_starts(lines, field):
    return {ln.index(field(ln)) for ln in lines}


def test_columns_stay_aligned_past_long_names(artifact):
    """`kernl.bert_embeddings` (21 characters) pushed its row's columns past an 18-wide
    field, as Triton function names did past a 32-wide one, and a KV length of 32768 past 14."""
    report = inspect_artifact(artifact)
    text = render_text(report).splitlines()
    rows = text[text.index("kernl ops and chosen implementations:") + 2 :]
    rows = rows[: next(i for i, ln in enumerate(rows) if not ln.startswith("      "))]
    assert any("kernl.bert_embeddings" in ln for ln in rows)
    assert len(_column_starts(rows, lambda ln: ln.split()[2])) == 1, "\n".join(rows)

    kernels = [
        {
            "name": name,
            "function": function,
            "num_warps": warps,
            "shared_mem": shared,
            "file": f"kernels/{name}.cubin",
            "bytes": size,
            "meta": {"num_ctas": 1},
        }
        for name, function, warps, shared, size in [
            ("k0", "_fused_linear_kernel", 4, 0, 20480),
            (
                "decode_attention_split_k_0001",
                "_decode_attention_split_kv_reduce_kernel",
                16,
                49152,
                2 << 20,
            ),
        ]
    ]
    lines = render_text(dataclasses.replace(report, kernels=kernels)).splitlines()
    lines = [ln for ln in lines if "warps=" in ln]
    for field in ("warps=", "shared=", "num_ctas="):
        assert len(_column_starts(lines, lambda ln, f=field: f)) == 1, "\n".join(lines)

    decode = [
        dataclasses.replace(report.buckets[0], batch=1, seq=seq, stage="decode")
        for seq in (16, 32768)
    ]
    lines = render_text(dataclasses.replace(report, task="causal-lm", buckets=decode))
    lines = [ln for ln in lines.splitlines() if "decode" in ln.split()[:1] or "stage" in ln]
    assert len(lines) == 3 and len({len(ln.rstrip()) for ln in lines}) == 1, "\n".join(lines)


def test_not_an_artifact_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "kernl inspect: error:" in result.output and "manifest" in result.output


def test_compile_summary_and_inspect_count_the_same_ops(tmp_path):
    """They disagreed: the summary counted tuned kernel instances (16), inspect every kernl op
    (17, with kernl.mask_to_bias). Both now print op_counts.count_ops."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**SMALL)).eval()
    out = tmp_path / "b.kernl"
    report = kernl.compiler.compile(model, "batch=1 seq=8", out, dtype="fp32", device="cpu")
    inspected = inspect_artifact(out)
    for compiled, shown in zip(report.buckets, inspected.buckets, strict=True):
        c = compiled.counts
        assert (c.instructions, c.kernl_ops, c.on_triton) == (
            shown.instructions,
            shown.kernl_ops,
            shown.on_triton,
        )
        assert shown.kernl_ops == sum(k.count for k in shown.kernel_choices)
        assert shown.on_triton == sum(k.count for k in shown.kernel_choices if k.impl == "triton")
        assert 0 < c.on_triton < c.kernl_ops < c.instructions  # mask_to_bias stays on aten
        summary_row = next(ln for ln in report.table().splitlines() if ln.split()[:1] == ["1x8"])
        inspect_row = next(
            ln for ln in render_text(inspected).splitlines() if ln.split()[:1] == ["1x8"]
        )
        assert f"1x8: {c.kernl_ops} kernl ops, {c.on_triton} on Triton kernels" in report.table()
        numbers = [str(c.instructions), str(c.kernl_ops), str(c.on_triton)]
        assert summary_row.split()[-3:] == numbers, summary_row
        assert inspect_row.split()[-5:-2] == numbers, inspect_row


def test_causal_lm_artifact_shows_its_generation_buckets(tmp_path):
    torch.manual_seed(0)
    config = T.GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        vocab_size=97,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    out = tmp_path / "lm.kernl"
    gpt2 = T.GPT2LMHeadModel(config).eval()
    gpt2.generation_config.do_sample, gpt2.generation_config.temperature = True, 0.7
    compiled = kernl.compiler.compile(
        gpt2,
        "batch=1,2 prompt=8 cache=16,32",
        out,
        dtype="fp32",
        device="cpu",
    )
    report = inspect_artifact(out)
    assert compiled.artifact_bytes == report.total_bytes == sum(_disk_sizes(out).values())
    stages = sorted((b.stage, b.batch, b.seq) for b in report.buckets)
    assert stages == [
        ("decode", 1, 16),
        ("decode", 1, 32),
        ("decode", 2, 16),
        ("decode", 2, 32),
        ("prefill", 1, 8),
        ("prefill", 2, 8),
    ]
    text = render_text(report)
    assert "plain aten programs" not in text and "0 instructions" not in text
    for needle in (
        "KV cache    32 slots",
        "decode step attention=torch",
        "prompt 8",
        "KV length 16",
        "KV length 32",
        "2 prefill bucket(s)",
        "4 decode bucket(s)",
        "no kernel binaries (plain torch decode step, CPU build)",
        # what a call that leaves them out samples with
        "decoding    the generation config's, where a call leaves them out: do_sample=True, "
        "temperature=0.7",
    ):
        assert needle in text, (needle, text)
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert {b["stage"] for b in as_json["buckets"]} == {"prefill", "decode"}
    assert as_json["generation_defaults"] == {"do_sample": True, "temperature": 0.7}


def _edited_copy(artifact, tmp_path, manifest_edit=None, meta_edit=None):
    """A copy of the artifact with its manifest and first program edited as verify allows
    (hashes recomputed): what a hand-edited or foreign artifact may hold."""
    import shutil
    from pathlib import Path

    import msgpack

    from kernl.artifacts.writer import file_hashes, pack_manifest

    root = tmp_path / "edited.kernl"
    shutil.copytree(artifact, root)
    m = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), raw=False)
    if meta_edit:
        prog = root / m["buckets"][0]["program"]
        p = msgpack.unpackb(prog.read_bytes(), raw=False, strict_map_key=False)
        meta_edit(p["meta"])
        prog.write_bytes(msgpack.packb(p, use_bin_type=True))
        m["files"], _ = file_hashes({rel: Path(root) / rel for rel in m["files"]})
    if manifest_edit:
        manifest_edit(m)
    (root / "manifest.msgpack").write_bytes(pack_manifest(m))
    return root


def test_values_of_an_unexpected_type_are_shown_not_a_crash(artifact, tmp_path):
    root = _edited_copy(
        artifact,
        tmp_path,
        manifest_edit=lambda m: m["extra"].update(atol="tight"),
        meta_edit=lambda meta: meta.update(note=b"\x00\x01"),
    )
    assert CliRunner().invoke(main, ["verify", str(root)]).exit_code == 0
    text = CliRunner().invoke(main, ["inspect", str(root)])
    assert text.exit_code == 0, text.output
    assert "validation  atol 'tight', rtol 0.0001" in text.output
    as_json = CliRunner().invoke(main, ["inspect", "--json", str(root)])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert report["tolerance"]["atol"] == "tight"
    assert report["buckets"][0]["meta"]["note"] == repr(b"\x00\x01")


def test_terminal_escapes_from_the_manifest_are_not_printed(artifact, tmp_path):
    root = _edited_copy(
        artifact,
        tmp_path,
        manifest_edit=lambda m: m.update(model_source="\x1b[2J\x1b[31mPWNED\nfake line\u202e"),
    )
    result = CliRunner().invoke(main, ["inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "from \\x1b[2J\\x1b[31mPWNED\\nfake line\\u202e" in result.output
    as_json = CliRunner().invoke(main, ["inspect", "--json", str(root)])
    assert "\x1b" not in as_json.output
    assert json.loads(as_json.output)["model_source"].startswith("\x1b[2J")


def test_inspect_help_says_it_checks_no_hashes():
    help_text = CliRunner().invoke(main, ["inspect", "--help"]).output
    assert "checks no hashes" in help_text and "kernl verify" in help_text


@pytest.mark.parametrize(
    "value, shown", [(1, []), ([0, "BertModel"], ["BertModel"]), ("BertModel", ["BertModel"])]
)
def test_a_hand_edited_architectures_field_is_shown_not_a_traceback(
    artifact, tmp_path, value, shown
):
    """load() and `kernl verify` accept a manifest whose config `architectures` is not a list
    of names (the config is the model's, not checked); inspect raised TypeError on an int,
    and spelled a string one letter per name."""
    import shutil

    import msgpack

    from kernl.artifacts import pack_manifest

    root = tmp_path / "a.kernl"
    shutil.copytree(artifact, root)
    manifest = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), strict_map_key=False)
    manifest["model_config"]["architectures"] = value
    (root / "manifest.msgpack").write_bytes(pack_manifest(manifest))
    assert read_manifest(root).model_config["architectures"] == value  # a valid manifest
    assert inspect_artifact(root).architectures == shown
    result = CliRunner().invoke(main, ["inspect", str(root)])
    assert result.exit_code == 0, result.output
