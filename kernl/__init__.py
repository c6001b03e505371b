"""kernl: ahead-of-time compilation of transformer models onto fused Triton kernels."""

import os as _os

__version__ = "0.1.0"


def _select_triton_mode() -> None:
    # Without a GPU, kernl's kernels run through Triton's interpreter (CPU mode). Triton
    # reads TRITON_INTERPRET when it is first imported (transformers and torch.export import
    # it too), so kernl sets it here, when nothing has imported Triton yet. A process that
    # imported Triton first still works: kernl ops then fall back to their aten path on the
    # CPU (see kernl.runtime.kernl_ops.triton_usable).
    if "TRITON_INTERPRET" in _os.environ:
        return
    import sys

    if "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


_select_triton_mode()
