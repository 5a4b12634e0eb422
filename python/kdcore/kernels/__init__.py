"""Triton GPU kernels of kdcore (imported as kdcore.kernels)."""
