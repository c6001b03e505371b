"""The replica's GPU, with torch alone (no Ray, no Starlette): which device a replica serves
on, and whether a failed call left that device's CUDA context unusable."""

from __future__ import annotations


def replica_device(configured: str | None) -> str:
    """The configured device, else CUDA where the replica has a GPU (read in the replica's
    process, after Ray has set its visible GPUs)."""
    if configured is not None:
        return configured
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_context_error(device) -> str | None:
    """After a failed model call: the error that the CUDA context now holds for good, if the
    failure was a kernel's (an illegal address, a device-side assert: "any further CUDA work
    will return the same error", says CUDA's documentation), or None (a usable context, or
    no CUDA device). Waits for the work queued on the device: ask it where no other call
    runs (the replica's worker thread, or between two generation batches)."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        return str(e)
    return None
