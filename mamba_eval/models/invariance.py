"""Batch invariance: a request's result does not depend on which other requests share its batch.

One :class:`Invariance` is built per model, from the device and the user's flag
(``batch_invariant``, default true in ``--model mamba``), when the model is built. The op
backend (``mamba_eval.models.ops``), the model's decoding step, the scoring engine and generation
all ask it; nothing else decides. With it, ``batch_size`` and the order of the requests change
no bit of a score, and a prompt decodes to the same tokens at every batch size (on one device,
dtype and thread count).

What it means per device:

CUDA
    The ops are the batch-invariant variants: the scans and norms launch with a configuration
    that ignores the batch size, and every matrix product (sequence forwards, LM head, decoding
    steps) is our Triton GEMM, whose tiling is fixed per weight shape and never split over K by
    row count (``kernels/matmul.py``), instead of cuBLAS, which picks its algorithm per shape.
    Mamba-1 decoding steps always take the four separate ops (the fused step is faster at small
    batches, but which path ran would depend on the batch size). No padding is added.
CPU
    The reference ops act on each row alone, but the libraries under them cut a batch by its
    total size: MKL's sgemm computes a row by another code path when a thread gets fewer than
    about 4 rows, and PyTorch's element-wise loops finish each thread's share with a scalar
    tail that rounds differently. So every forward and every decoding step gets at least
    :meth:`Invariance.min_rows` rows (filler rows of padding) and a multiple of
    :meth:`Invariance.alignment` positions (rows x length), which puts every thread's share on
    a SIMD-vector boundary. The scoring engine and generation shape their batches this way.
    Mamba-1 decoding steps take the four ops, as on CUDA.
Off (``batch_invariant=false``)
    cuBLAS and the fastest launch configurations, the fused Mamba-1 step for small batches, no
    filler rows. Scores agree with the invariant ones to rounding, but a change in batching can
    change their last bits, and a near-tie of two tokens in greedy decoding can go either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Invariance:
    """The batch-invariance policy of one model (module docstring)."""

    enabled: bool = False
    device_type: str = "cpu"

    @classmethod
    def for_device(cls, device, enabled: bool) -> Invariance:
        return cls(enabled=bool(enabled), device_type=torch.device(device).type)

    @property
    def pads_batches(self) -> bool:
        """Whether batches get filler rows and aligned shapes (CPU only)."""
        return self.enabled and self.device_type == "cpu"

    def min_rows(self) -> int:
        """The fewest rows a forward or decoding step is given: on the CPU 8 per intra-op thread
        (at least 16), so every thread's share of a matrix product keeps MKL's usual code path;
        1 elsewhere or when off."""
        return max(16, 8 * torch.get_num_threads()) if self.pads_batches else 1

    def alignment(self) -> int:
        """Rows x length of every forward is a multiple of this: on the CPU 64 per intra-op
        thread, so a tensor of ``positions x width`` elements splits into thread shares that are
        whole multiples of 64 elements (the widest pair of SIMD vectors PyTorch's element-wise
        loops use: AVX-512, 16-bit types), for every thread count that divides the threads; 1
        elsewhere or when off."""
        return 64 * torch.get_num_threads() if self.pads_batches else 1

    def step_rows(self, n: int) -> int:
        """Rows a decoding step of ``n`` sequences runs on (filler rows included)."""
        if not self.pads_batches:
            return n
        unit = self.alignment()
        return -(-max(n, self.min_rows()) // unit) * unit
