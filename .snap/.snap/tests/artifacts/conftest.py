from pathlib import Path

import pytest
from artifact_edit import compile_small, compile_small_causal_lm


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory) -> Path:
    """A valid artifact (2 buckets, kernl ops) that tests copy before breaking."""
    out = tmp_path_factory.mktemp("valid") / "bert.kernl"
    compile_small(out)
    return out


@pytest.fixture(scope="session")
def small_causal_lm(tmp_path_factory) -> Path:
    """A valid causal-LM artifact (GPT-2, batches 1 and 2, prompt 8, cache 16)."""
    out = tmp_path_factory.mktemp("valid-gen") / "gpt2.kernl"
    compile_small_causal_lm(out)
    return out
