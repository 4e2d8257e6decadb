"""Compute kernels: tensors and ints in, tensors out (no configs)."""
