"""Sequence-mixing operators of Mamba and Mamba-2 (installed as ``mamba_eval.kernels``).

One module per operator, in reading order: a docstring with the equations (paper, section,
shapes, what is written in place); ``<op>_ref``, the plain-PyTorch reference, in fp32 and written
for clarity; the private ``@triton.jit`` kernels; the public wrapper ``<op>``, with the signature
of the reference. Everything here is forward only: this package evaluates models, it does not
train them.

- ``conv1d``: depthwise causal convolution over time (+ SiLU), full sequence and one-token update.
- ``selective_scan``: the Mamba-1 selective SSM (diagonal A per channel), sequence and one step.
- ``ssd``: the Mamba-2 SSD scan (scalar A per head, chunked), sequence and one step.
- ``mamba3``: the Mamba-3 SSM (trapezoidal rule, rotated B/C, MIMO ranks): chunked form,
  recurrence and one step; Triton kernels of the chunked scan and the step (the model uses the
  references until they are checked on a GPU).
- ``moe``: the routed experts of a mixture of experts as grouped products over tokens sorted by
  expert, each token's result independent of the others (not yet used by the model).
- ``mamba1_step``: one Mamba-1 decoding step between the projections (conv update, x_proj,
  dt_proj, state update) in two kernels.
- ``norm``: fused residual-add + RMSNorm/LayerNorm, and Mamba-2's gated, grouped RMSNorm.
- ``matmul``: the linear layers' ``x W^T + b`` with a tiling fixed per weight shape, so that
  every row's result is bitwise independent of the other rows (batch invariance).
- ``matmul_hopper``: the same contract for Hopper GPUs, with TMA loads and persistent programs
  (not yet used by the model).
- ``utils``: what the kernel files share (as ``fla/ops/utils``): the "Triton absent" guard
  (``jit``, ``require_triton``), Triton's CPU interpreter (``dot``, ``dot_acc``), the fp32
  activations (``softplus``, ``softplus_log1p``, ``silu``, ``silu_approx``), ``sm_count``,
  ``new_output`` and the references' ``discretise_dt``. No kernel file imports another's
  private names.

The sequence kernels (``selective_scan``, ``ssd_scan``, ``add_rmsnorm``, ``gated_rmsnorm``) take
``batch_invariant=True`` to launch with a configuration that does not depend on the batch size.

Shape glossary (used in every docstring and shape comment of this package)
--------------------------------------------------------------------------
======  =================================================================================
``B``   batch size
``L``   sequence length
``D``   model width ``d_model``; in the Mamba-1 scan, ``D`` is the number of scanned
        channels (``d_inner = expand * d_model``)
``N``   SSM state size ``d_state``
``H``   number of heads (Mamba-2), ``d_inner = H * P``
``P``   head dimension ``headdim`` (Mamba-2)
``G``   number of B/C groups ``ngroups`` (Mamba-2); heads ``g*H/G ... (g+1)*H/G - 1`` share group g
``R``   MIMO rank (Mamba-3; 1 for SISO)
``S``   rotary angles per head (Mamba-3)
``K``   convolution width ``d_conv``
``C``   chunk length of the SSD algorithm; in ``conv1d``, ``C`` is the number of channels
======  =================================================================================

Symbol glossary: code name -> paper symbol (Gu & Dao 2023, "Mamba", Sec. 2-3; Dao & Gu 2024, "SSD")
-------------------------------------------------------------------------------------------------
==================  ==========================================================================
``dt`` / ``delta``  Δ, the input-dependent step size: ``softplus(dt_proj(x) + dt_bias)``
``A``               A, the continuous-time state matrix: ``A = -exp(A_log)``; diagonal ``[D, N]``
                    in Mamba-1, one scalar per head ``[H]`` in Mamba-2. Discretised as
                    ``Ā = exp(Δ A)`` (zero-order hold)
``B``               B, the input-dependent input matrix (per position); ``B̄ x = Δ B x``
                    (the simplified Euler discretisation the papers use)
``C``               C, the input-dependent output matrix (per position)
``D``               D, the skip connection ``y += D * x``
``x`` / ``u``       x, the SSM input (the convolved, activated branch of ``in_proj``)
``z``               z, the gate: ``y * silu(z)`` (Mamba-1) or ``RMSNorm(y * silu(z))`` (Mamba-2)
``state`` / ``h``   h, the recurrent SSM state: ``h_t = Ā_t h_{t-1} + B̄_t x_t``, ``y_t = C_t h_t``
==================  ==========================================================================

States are always kept in fp32; outputs come back in the dtype of the input activations.
"""
