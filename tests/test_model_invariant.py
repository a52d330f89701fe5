"""The batch-invariant model (``MambaLMHeadModel(..., batch_invariant=True)``): its ops are the
kernels' batch-invariant variants and the row-count-independent GEMM; a row's logits and states
do not depend on the rest of the batch; results equal the reference model's.

Without a GPU the Triton kernels run in the interpreter (conftest.py), at tiny sizes; there
the bitwise check exercises the wiring and the kernels' logic, the GPU run checks the hardware's
rounding (tests/test_gpu_engine.py)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from mamba_eval.backend import get_ops
from mamba_eval.config import MambaConfig
from mamba_eval.model import MambaLMHeadModel

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_invariant_ops_are_wired():
    from mamba_eval.kernels import matmul

    for name in ("ref", "triton"):
        plain, inv = get_ops(name), get_ops(name, batch_invariant=True)
        assert not plain.batch_invariant and inv.batch_invariant
        assert plain.linear is matmul.linear_ref  # cuBLAS unless invariance is asked for
        for field in ("selective_scan", "ssd_scan", "add_norm", "gated_rmsnorm"):
            fn = getattr(inv, field)
            assert isinstance(fn, functools.partial) and fn.keywords == {"batch_invariant": True}
            assert fn.func is getattr(plain, field)
    assert get_ops("triton", batch_invariant=True).linear is matmul.linear
    assert get_ops("ref", batch_invariant=True).linear is matmul.linear_ref


def _config(arch):
    mamba2 = arch == "mamba2"
    return MambaConfig(arch=arch, d_model=32, n_layer=2, vocab_size=96, d_state=16 if mamba2 else 8, d_conv=4,
                       expand=2, dt_rank=0 if mamba2 else 4, headdim=16 if mamba2 else 0, ngroups=1,
                       chunk_size=16 if mamba2 else 0)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.inference_mode()
def test_rows_do_not_depend_on_the_batch_and_equal_the_reference(arch):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = MambaLMHeadModel(_config(arch), backend="triton", device=DEVICE, dtype=dtype, batch_invariant=True)
    ref = MambaLMHeadModel(_config(arch), backend="ref", device=DEVICE, dtype=dtype)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (5, 21), device=DEVICE)
    logits, states = model(ids, return_state=True)
    ref_logits, _ = ref(ids)
    assert_close(logits, ref_logits, 2e-2 if dtype == torch.bfloat16 else 1e-4)
    for i in (0, 3):
        alone, alone_states = model(ids[i:i + 1], return_state=True)
        assert torch.equal(alone[0], logits[i])
        for a, b in zip(alone_states, states):
            assert torch.equal(a.ssm[0], b.ssm[i]) and torch.equal(a.conv[0], b.conv[i])
    # Padding after a row does not change it either.
    short, _ = model(ids[:, :13])
    assert torch.equal(short, logits[:, :13])
    # Decoding steps use F.linear whatever the ops.
    assert model.lm_logits(logits.new_zeros(1, 32).to(dtype), F.linear).shape == (1, 96)
