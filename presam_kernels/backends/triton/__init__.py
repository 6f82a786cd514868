"""Fused Triton kernels (issue 3)."""
