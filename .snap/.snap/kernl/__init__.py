"""kernl: ahead-of-time compilation of transformer models onto fused Triton kernels."""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the compiler (and transformers) load on the first call
    import torch

    from kernl.compiler.optimize import OptimizedModel

from kernl._version import __version__ as __version__


def optimize(model: torch.nn.Module, buckets: Any = None, **options: Any) -> OptimizedModel:
    """`model = kernl.optimize(hf_model, buckets="batch=1,8 seq=16:512")`: compile a Hugging
    Face model object with kernl (or load it from kernl's cache, $KERNL_CACHE_DIR) and return
    it: an encoder is called like the original; a generation model (causal LM, T5/BART/Marian,
    Whisper) is kernl's, with `generate(...)` and `stream(...)`; without `buckets` they come
    from the config. Options: dtype, device, task, save_to, cache_dir, progress, atol, rtol,
    kernels, tune; see `kernl.compiler.optimize.optimize`.

    Imported on first call: `import kernl` and `import kernl.runtime` never import
    transformers or the compiler."""
    from kernl.compiler.optimize import optimize as _optimize

    return _optimize(model, buckets, **options)


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
