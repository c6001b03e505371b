"""The encoder validation compares each output with eager's a slice at a time in float64
(whole, a masked LM's logits at 64x512 held ~45 GB of float64 temporaries): the same largest
error, first bad element and finiteness as the whole comparison, whatever the slice."""

from __future__ import annotations

import pytest
import torch

import kernl.compiler.validate as validate


def _whole(o, e, atol, rtol):
    o64, e64 = o.double(), e.double()
    err = (o64 - e64).abs()
    bad = (err > atol + rtol * e64.abs()).reshape(-1).nonzero()
    first = int(bad[0]) if len(bad) else None
    finite = (bool(torch.isfinite(o64).all()), bool(torch.isfinite(e64).all()))
    return float(err.nan_to_num(0).max()), first, finite


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 24])
def test_slices_compare_as_the_whole(monkeypatch, chunk):
    monkeypatch.setattr(validate, "COMPARE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 5, 11, generator=g).half()
    o = (e.float() + 1e-3 * torch.randn(3, 5, 11, generator=g)).half()
    o[2, 1, 4] += 0.5  # the first element beyond the tolerance, row-major
    o[2, 3, 9] += 2.0  # the largest error, after it
    c = validate._compare(o, e, 1e-2, 0.0)
    max_err, first, finite = _whole(o, e, 1e-2, 0.0)
    assert (c.max_err, c.first_bad, (c.ours_finite, c.eager_finite)) == (max_err, first, finite)
    assert c.first_bad == (2 * 5 + 1) * 11 + 4
    o[0, 0, 0] = float("nan")
    e[1, 0, 0] = float("inf")
    c = validate._compare(o, e, 1e-2, 0.0)
    assert (c.ours_finite, c.eager_finite) == (False, False)
    assert c.max_err == _whole(o, e, 1e-2, 0.0)[0]
    assert validate._max_abs_diff(o, e) == float("inf")  # NaN reads as inf
    assert validate._compare(o[:0], e[:0], 0.0, 0.0).first_bad is None
