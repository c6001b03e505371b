"""Papercuts of a new user's first minutes: the demo leaves no ~90 MiB artifact behind in
/tmp, and the README's links point at files that exist."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("demo_minilm", ROOT / "examples/demo_minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile.mkdtemp honours it (cache reset)
    monkeypatch.setattr("tempfile.tempdir", None)
    return module


def fake_run(written, fail=False):
    def run(out, device, dtype):
        Path(out).mkdir(parents=True)
        (Path(out) / "weights.safetensors").write_bytes(b"\0" * 1024)
        written.append(Path(out))
        if fail:
            sys.exit("embeddings differ from eager")

    return run


@pytest.mark.parametrize("fail", [False, True])
def test_demo_removes_its_temporary_artifact(demo, monkeypatch, tmp_path, capsys, fail):
    written = []
    monkeypatch.setattr(demo, "run", fake_run(written, fail))
    monkeypatch.setattr(sys, "argv", ["demo_minilm.py", "--device", "cpu"])
    if fail:
        with pytest.raises(SystemExit):
            demo.main()
    else:
        demo.main()
        assert "pass --out DIR to keep it" in capsys.readouterr().out
    assert len(written) == 1 and written[0].is_relative_to(tmp_path)
    assert not written[0].exists() and list(tmp_path.iterdir()) == []


def test_demo_keeps_an_artifact_written_with_out(demo, monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(demo, "run", fake_run(written))
    monkeypatch.setattr(sys, "argv", ["demo_minilm.py", "--out", str(tmp_path / "keep.kernl")])
    demo.main()
    assert written == [tmp_path / "keep.kernl"] and (tmp_path / "keep.kernl").is_dir()


def test_readme_links_point_at_files():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)", text)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert "docs/design.md" in local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    # A file named in backquotes as a document must exist too (the README once said
    # `DESIGN.md`, a file the repository does not have).
    named = re.findall(r"`([\w./-]+\.md)`", text)
    assert not [n for n in named if not (ROOT / n).exists()], named
