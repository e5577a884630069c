"""Per-replica compute of SyncBN: local statistics, normalization, and their backward.

``torch_ops`` composes torch's own fast kernels (a per-channel sum, BatchNorm's
inference kernel, BatchNorm's backward kernel) into the passes SyncBN needs; it runs on
any device torch supports.
"""
