"""Triton kernels, one fused operation per file (kernel, reference, launcher, tuning space)."""
