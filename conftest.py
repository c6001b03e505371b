import os

# Kernels run through Triton's interpreter unless a GPU is there; the variable must be set
# before triton.jit decorates anything.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not _has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # With pytest-xdist (`make test` runs two workers): the serving tests start Ray Serve
    # clusters and `kernl serve` processes that wait for readiness; two at once on CI's two
    # cores would starve each other, so they all run on one worker (--dist loadgroup).
    serving = pytest.mark.xdist_group("serving")
    for item in items:
        if item.path.parent.name == "serving":
            item.add_marker(serving)
