"""Layers that fill Megatron's spec slots (norms, routers, experts, MLP replacements)."""
