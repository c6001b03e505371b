"""On a real GPU: the replica's check after a failed call (device.cuda_context_error, which
imports neither Ray nor Starlette, so this runs where Ray Serve is not installed) tells a
context a kernel broke for good from one that still runs. The CPU tests fake
torch.cuda.synchronize; what they assume, that a device-side assert makes every later
synchronize raise, is checked here, in a child process whose context it may break."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = """
import torch
from kernl.serving.device import cuda_context_error

assert cuda_context_error("cuda") is None
try:  # a call that fails on the host: the context stays usable
    torch.ones(2, 3, device="cuda") @ torch.ones(4, 5, device="cuda")
except RuntimeError:
    pass
assert cuda_context_error("cuda") is None, "a shape error broke nothing"
table = torch.zeros(4, device="cuda")
try:  # an index past the table: a device-side assert
    table[torch.tensor([40], device="cuda")].sum().item()
except RuntimeError:
    pass
first = cuda_context_error("cuda")
second = cuda_context_error("cuda")
print("sticky" if first and second else f"not sticky: {first!r} {second!r}")
"""


@pytest.mark.gpu
def test_a_device_side_assert_is_seen_by_every_later_check():
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "sticky", done.stdout
