"""Triton kernels and their launchers (installed as ``tofu_triton.kernels``)."""
