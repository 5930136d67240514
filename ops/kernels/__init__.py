"""Triton kernels for one whole merge step (`ops.merge`'s semantics), one launch per merging layer.

`token_merge(x, size, metric, valid, step, num_prefix)` runs a `MergeStep` fused; on CUDA it is
the implementation of `torch.ops.pitome.token_merge`, and TensorRT's plugin runs the same kernel
ahead of time. Importing this package imports triton; `ops.merge` imports it lazily.
"""

from ops.kernels.launch import LAUNCHES_PER_LAYER, kernel_constants, token_merge, token_merge_with_slots

__all__ = ["LAUNCHES_PER_LAYER", "kernel_constants", "token_merge", "token_merge_with_slots"]
