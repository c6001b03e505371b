"""kernl: ahead-of-time compilation of transformer models onto fused Triton kernels."""

__version__ = "0.1.0"
