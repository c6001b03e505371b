"""A caller's numpy or torch scalars as the Python numbers they hold (a loop over np.arange,
a value read from a tensor): generate's options and an open batch's join take them."""

from __future__ import annotations

from typing import Any


def plain_number(value: Any) -> Any:
    """A numpy or 0-dim torch integer or float as the Python number it holds (lists, and 1-D
    arrays and tensors such as HF's eos_token_id tensor, item by item); anything else as it
    is, for the checks to judge."""
    if value is None or type(value) in (int, float, bool, str):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(plain_number(v) for v in value)
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        kind = str(value.dtype)
        if "int" in kind or "float" in kind:
            return value.tolist()
    if getattr(value, "ndim", None) == 0:  # np.int64(4), torch.tensor(4)
        kind = str(value.dtype)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    return value
