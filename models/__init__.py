"""Tessera models: PyTorch only; knows tensors, not slides (never imports core)."""
