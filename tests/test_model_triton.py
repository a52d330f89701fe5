"""The model on the Triton backend equals the model on the reference backend, same weights.

On the CPU the kernels run in Triton's interpreter (tiny checkpoints); on a GPU in bf16 the same
comparison runs with a bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from mamba_eval.models.checkpoint import load_model


@pytest.fixture(params=["mamba1-small", "mamba2-small"])
def pair(request, checkpoint):
    ckpt = checkpoint(request.param)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    ref = load_model(ckpt.ssm_dir, dtype=dtype, device=device, backend="ref")
    tri = load_model(ckpt.ssm_dir, dtype=dtype, device=device, backend="triton")
    return ref, tri, (2e-2 if dtype == "bfloat16" else 1e-4)


# (batch, length, split) per architecture in Triton's interpreter: Mamba-2 crosses its 16-position
# chunks unevenly (the split, too); the Mamba-1 scan has no chunks, 4-position tiles.
SIZES = {"mamba1": (2, 19, 11), "mamba2": (2, 35, 18)}


def test_forward_and_states(pair):
    ref, tri, tol = pair
    gen = torch.Generator().manual_seed(0)
    batch, length, split = SIZES[ref.config.kinds[0]] if ref.device.type == "cpu" else (3, 37, 20)
    ids = torch.randint(0, ref.config.vocab_size, (batch, length), generator=gen).to(ref.device)
    logits_ref, state_ref = ref(ids, return_state=True)
    logits_tri, state_tri = tri(ids, return_state=True)
    assert_close(logits_tri, logits_ref, tol)
    for a, b in zip(state_tri, state_ref):
        assert_close(a.conv, b.conv, tol)
        assert_close(a.ssm, b.ssm, tol)
    # State passing: the second part from the first part's state.
    _, mid = tri(ids[:, :split], return_state=True)
    tail, _ = tri(ids[:, split:], state=mid)
    assert_close(tail, logits_ref[:, split:], tol)


def test_step_equals_forward(pair):
    ref, tri, tol = pair
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=gen).to(ref.device)
    full, _ = ref(ids)
    _, state = tri(ids[:, :5], return_state=True)
    for t in range(5, 9):
        assert_close(tri.step(ids[:, t], state), full[:, t], tol)
