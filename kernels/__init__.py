"""Triton kernels for the U-Net hot loop (installed as ``sdfast.kernels``)."""
