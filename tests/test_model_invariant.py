"""The batch-invariant model (``LanguageModel(..., batch_invariant=True)``): its ops are the
kernels' batch-invariant variants and the row-count-independent GEMM; a row's logits and states
do not depend on the rest of the batch; results equal the reference model's.

Without a GPU the Triton kernels run in the interpreter (conftest.py), at tiny sizes; there
the bitwise check exercises the wiring and the kernels' logic, the GPU run checks the hardware's
rounding (tests/test_gpu_engine.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import assert_close
from mamba_eval.models.config import mamba_stack
from mamba_eval.models.invariance import Invariance
from mamba_eval.models.model import LanguageModel
from mamba_eval.models.ops import get_ops

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_invariant_ops_are_wired():
    from mamba_eval.kernels import matmul

    for name in ("ref", "triton"):
        plain, inv = get_ops(name), get_ops(name, Invariance(enabled=True))
        assert not plain.batch_invariant and inv.batch_invariant
        assert plain.linear is matmul.linear_ref  # cuBLAS unless invariance is asked for
        assert plain.step_linear is matmul.linear_step_ref
        for field in ("selective_scan", "ssd_scan", "add_norm", "gated_rmsnorm"):
            fn = getattr(inv, field)
            assert isinstance(fn, functools.partial) and fn.keywords == {"batch_invariant": True}
            assert fn.func is getattr(plain, field)
    assert get_ops("triton", Invariance(enabled=True)).linear is matmul.linear
    assert get_ops("triton", Invariance(enabled=True)).step_linear is matmul.linear_step
    assert get_ops("ref", Invariance(enabled=True)).linear is matmul.linear_ref


def _config(arch):
    if arch == "mamba1":
        return mamba_stack(arch=arch, d_model=32, n_layer=2, vocab_size=96, d_state=8, d_conv=4, expand=2, dt_rank=4)
    return mamba_stack(arch=arch, d_model=32, n_layer=2, vocab_size=96, d_state=16, d_conv=4, expand=2, headdim=16,
                       ngroups=1, chunk_size=16)


def _models(arch):
    """The batch-invariant Triton model, the reference model on the same weights, and the
    tolerance between them (bf16 on a GPU, fp32 in the interpreter)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = LanguageModel(_config(arch), backend="triton", device=DEVICE, dtype=dtype, batch_invariant=True)
    ref = LanguageModel(_config(arch), backend="ref", device=DEVICE, dtype=dtype)
    ref.load_state_dict(model.state_dict())
    return model, ref, 2e-2 if dtype == torch.bfloat16 else 1e-4


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.inference_mode()
def test_rows_do_not_depend_on_the_batch_and_equal_the_reference(arch):
    model, ref, tol = _models(arch)
    ids = torch.randint(0, 96, (5, 21), device=DEVICE)
    logits, states = model(ids, return_state=True)
    ref_logits, _ = ref(ids)
    assert_close(logits, ref_logits, tol)
    for i in (0, 3):
        alone, alone_states = model(ids[i:i + 1], return_state=True)
        assert torch.equal(alone[0], logits[i])
        for a, b in zip(alone_states, states):
            assert torch.equal(a.ssm[0], b.ssm[i]) and torch.equal(a.conv[0], b.conv[i])
    # Padding after a row does not change it either.
    short, _ = model(ids[:, :13])
    assert torch.equal(short, logits[:, :13])


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.inference_mode()
def test_decoding_steps_do_not_depend_on_the_batch(arch):
    """Decoding steps with batch-invariant ops: a sequence's logits after each step are the same
    bits at batch 1, 3 and 7 (with ``F.linear`` for the products they are not), and close to the
    reference model's, states included."""
    model, ref, tol = _models(arch)
    ids = torch.randint(0, 96, (7, 9), device=DEVICE)
    steps = {}
    for batch in (7, 3, 1):
        _, state = model(ids[:batch, :6], return_state=True)
        steps[batch] = [model.step(ids[:batch, t], state) for t in range(6, 9)]
        last_state = state
    for batch in (3, 1):
        for t, (mine, full) in enumerate(zip(steps[batch], steps[7])):
            assert torch.equal(mine, full[:batch]), f"batch {batch}, step {t}: logits differ from batch 7"
    _, ref_state = ref(ids[:1, :6], return_state=True)
    for t in range(6, 9):
        want = ref.step(ids[:1, t], ref_state)
    assert_close(steps[1][-1], want, tol)
    for a, b in zip(last_state, ref_state):
        assert_close(a.ssm.float(), b.ssm.float(), tol)
