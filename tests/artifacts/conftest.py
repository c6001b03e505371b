from pathlib import Path

import pytest
from artifact_edit import compile_small


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory) -> Path:
    """A valid artifact (2 buckets, kernl ops) that tests copy before breaking."""
    out = tmp_path_factory.mktemp("valid") / "bert.kernl"
    compile_small(out)
    return out
