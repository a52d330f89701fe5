"""Mamba (Gu & Dao 2023) and Mamba-2 (Dao & Gu 2024) language models, forward only.

The network is mamba_ssm's ``MambaLMHeadModel``, with its parameter names and layouts, so its
checkpoints load without renaming (``mamba_eval.models.checkpoint`` maps the other formats onto these names)::

    backbone.embedding                                        token embedding        [V, D]
    backbone.layers.i.norm       pre-norm (fused with the residual add)
    backbone.layers.i.mixer      Mamba1Mixer or Mamba2Mixer (attention.Attention in the layers
                                 of config.attn_layer_idx)
    backbone.layers.i.norm2/mlp  pre-norm and gated MLP after the mixer, when config.d_intermediate > 0
    backbone.norm_f              final norm
    lm_head                      [V, D], the embedding itself when tie_embeddings

A block computes ``residual = x + residual; x = mixer(norm(residual))`` and then, with an MLP,
``residual = x + residual; x = mlp(norm2(residual))``; the residual stream is kept in fp32 when
``config.residual_in_fp32``. The SSM parameters (``A_log``, ``D`` and the Δ bias) stay fp32
whatever the model dtype, as the scans consume them in fp32. Falcon-Mamba's extra norms of Δ, B
and C (``config.bcdt_rmsnorm``) are weightless RMSNorms in plain PyTorch.

Operators come from a backend chosen once at construction (``mamba_eval.models.ops.get_ops``),
batch-invariant or not; decoding steps use ``ops.step_linear`` for their matrix products.
Sequence state is explicit: ``forward`` takes an optional initial ``ModelState`` (not modified)
and can return the final one; ``step`` advances a ``ModelState`` by one token IN PLACE. A Mamba
layer's state is a ``LayerState`` (conv window, SSM state); an attention layer's is an
``attention.AttnState`` (key/value cache), which offers the same methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.attention import Attention, AttnState, GatedMLP
from mamba_eval.models.ops import Ops, get_ops
from mamba_eval.models.config import MambaConfig
from mamba_eval.kernels.norm import weightless_rmsnorm_ref


@dataclass
class LayerState:
    """The recurrent state of one layer for a batch of sequences.

    ``conv``: the last K-1 inputs of the causal conv, ``[B, conv_dim, d_conv - 1]``, model dtype.
    ``ssm``: the SSM state, fp32; Mamba-1 ``[B, d_inner, d_state]``, Mamba-2 ``[B, nheads, headdim, d_state]``.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.conv.shape[0]

    def index_select(self, idx: torch.Tensor | list[int]) -> LayerState:
        """A new state holding rows ``idx`` of the batch (repeats allowed: this is how to fork)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.conv.device)
        return LayerState(self.conv.index_select(0, idx), self.ssm.index_select(0, idx))

    def clone(self) -> LayerState:
        return LayerState(self.conv.clone(), self.ssm.clone())

    def copy_(self, other: LayerState) -> LayerState:
        """Overwrite this state's tensors in place (keeps their storage, e.g. for CUDA graphs)."""
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        return self

    def rows(self, n: int) -> LayerState:
        """The ``n`` leading rows as views (same storage): steps on the view update this state."""
        return LayerState(self.conv[:n], self.ssm[:n])

    def zero_(self) -> LayerState:
        """Reset to the state before any token, in place."""
        self.conv.zero_()
        self.ssm.zero_()
        return self


ModelState = list  # one state per layer: LayerState (Mamba layers) or AttnState (attention layers)


def _padding_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] bool, True at the positions at or past each row's length."""
    return torch.arange(length, device=lengths.device).view(1, -1) >= lengths.view(-1, 1)


def _mask_padded_dt(dt: torch.Tensor, padded: torch.Tensor | None) -> torch.Tensor:
    """Δ before its bias and softplus, [B, L, ...], with ``-inf`` at the padded positions
    (``padded`` [B, L], True past a row's length): softplus(-inf + bias) is exactly 0, so the
    scan leaves the state unchanged there (``exp(0 A) = 1``, no input) and a row's final state
    is its state after its last real token, bit for bit.

    IN PLACE (``dt`` is, or is a view of, a projection's fresh output): the tensor keeps its
    strides, so the scan's element-wise work on it (bias, softplus) takes the same code paths,
    hence the same bits at the real positions, as without the mask."""
    if padded is None:
        return dt
    return dt.masked_fill_(padded.view(*padded.shape, *([1] * (dt.ndim - 2))), float("-inf"))


def _conv_state_at(x: torch.Tensor, initial: torch.Tensor | None, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state of each row after its own ``lengths[b]`` positions: the ``width - 1`` conv
    inputs before that position (``x`` [B, C, L], the conv's input), with ``initial`` ([B, C,
    width - 1], zeros when None) in front where a row is shorter, as the conv leaves it for an
    unpadded row. Returns [B, C, width - 1] in x's dtype."""
    batch, channels, _ = x.shape
    keep = width - 1
    if initial is None:
        initial = x.new_zeros(batch, channels, keep)
    full = torch.cat([initial.to(x.dtype), x], dim=-1)  # position t of x at column t + keep
    idx = lengths.view(batch, 1, 1) + torch.arange(keep, device=x.device).view(1, 1, keep)
    return full.gather(2, idx.expand(batch, channels, keep))


class _CachedA:
    """``A = -exp(A_log)`` in fp32 for a mixer, computed once per parameter value and reused (a
    decoding step would otherwise spend two kernel launches per layer on it). Recomputed when the
    parameter is written (its version counter moves) or replaced; computed afresh whenever
    gradients flow to ``A_log`` (training)."""

    def _neg_A(self) -> torch.Tensor:
        a_log = self.A_log
        if a_log.requires_grad and torch.is_grad_enabled():
            return -torch.exp(a_log.float())
        try:
            version = a_log._version
        except RuntimeError:  # an inference tensor has no version counter: no safe cache
            return -torch.exp(a_log.float())
        key = (a_log.data_ptr(), version, a_log.device, a_log.dtype, tuple(a_log.shape))
        cached = self.__dict__.get("_neg_A_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            value = -torch.exp(a_log.detach().float())
        self.__dict__["_neg_A_cache"] = (key, value)
        return value


class Norm(nn.Module):
    """Parameters of an RMSNorm (weight) or LayerNorm (weight, bias); applied by ``ops.add_norm``."""

    def __init__(self, dim: int, is_rms: bool, eps: float, **factory):
        super().__init__()
        self.is_rms, self.eps = is_rms, eps
        self.weight = nn.Parameter(torch.empty(dim, **factory))
        self.bias = None if is_rms else nn.Parameter(torch.empty(dim, **factory))

    def add_norm(self, ops: Ops, x, residual, residual_in_fp32: bool):
        return ops.add_norm(x, residual, self.weight, self.bias, self.eps, residual_in_fp32, self.is_rms)


def _conv_params(channels: int, width: int, bias: bool, **factory) -> nn.Conv1d:
    """Holder of a depthwise conv's parameters, weight ``[C, 1, K]`` as in mamba_ssm; applied by ``ops``."""
    return nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=bias, **factory)


def _inverse_softplus_dt(n: int, device, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4) -> torch.Tensor:
    """Δ bias whose softplus is log-uniform in [dt_min, dt_max] (mamba_ssm's initialisation)."""
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


#: Rows x d_inner up to which a Mamba-1 decoding step uses the fused op (``ops.mamba1_decode``).
#: Its programs loop over the rows one by one, so it wins at small batches and loses at large
#: ones: on an H200, inside a CUDA graph, 13.7 us against 16.2 for the four ops at batch 1 and
#: d_inner 5120, 7.7 against 12.4 at d_inner 1536; at batch 64, 186 against 32 us and 47
#: against 17 (scripts/bench_kernels.py --only mamba1_decode). The crossing points estimated
#: from those are about 2 rows at d_inner 5120 and 9 at 1536: 8192 elements puts both near it.
FUSED_DECODE_MAX_ELEMENTS = 8192


class Mamba1Mixer(_CachedA, nn.Module):
    """The Mamba-1 mixer (Mamba paper, Fig. 3): in_proj -> [x; z]; x -> conv -> SiLU -> selective
    scan with Δ, B, C = x_proj(x) (Δ through the low-rank dt_proj), gated by silu(z); out_proj."""

    def __init__(self, config: MambaConfig, ops: Ops, **factory):
        super().__init__()
        self.ops = ops
        d, di, n, r = config.d_model, config.d_inner, config.d_state, config.dt_rank
        self.d_state, self.dt_rank = n, r
        self.bcdt_eps = config.bcdt_rmsnorm_eps if config.bcdt_rmsnorm else None
        fp32 = {**factory, "dtype": torch.float32}
        self.in_proj = nn.Linear(d, 2 * di, bias=config.proj_bias, **factory)  # rows [x; z]
        self.conv1d = _conv_params(di, config.d_conv, config.conv_bias, **factory)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False, **factory)  # rows [dt; B; C]
        self.dt_proj = nn.Linear(r, di, bias=False, **factory)
        self.dt_proj.bias = nn.Parameter(torch.empty(di, **fp32))  # added in fp32 inside the scan
        self.A_log = nn.Parameter(torch.empty(di, n, **fp32))
        self.D = nn.Parameter(torch.empty(di, **fp32))
        self.out_proj = nn.Linear(di, d, bias=config.proj_bias, **factory)

    @torch.no_grad()
    def init_ssm_parameters(self):
        n = self.A_log.shape[-1]
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(self.A_log))  # S4D-real
        self.D.fill_(1.0)
        self.dt_proj.bias.copy_(_inverse_softplus_dt(self.D.shape[0], self.D.device))

    def _ssm_inputs(self, x: torch.Tensor, linear=None):
        """Δ (without its bias), B, C from the convolved x [..., d_inner]; with Falcon-Mamba's norms,
        the low-rank Δ, B and C are RMS-normalised first. ``linear``: default ``ops.linear``."""
        linear = linear or self.ops.linear
        dt, B, C = linear(x, self.x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bcdt_eps is not None:
            dt, B, C = (weightless_rmsnorm_ref(t, self.bcdt_eps) for t in (dt, B, C))
        return linear(dt, self.dt_proj.weight), B, C

    def forward(self, h: torch.Tensor, state: LayerState | None = None, lengths: torch.Tensor | None = None,
                padded: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState]:
        """h [B, L, D] -> (out [B, L, D], final LayerState); ``state`` (if given) is read, not written.

        ``lengths`` [B]: the returned state is each row's state after its position
        ``lengths[b] - 1`` (``MambaLMHeadModel.backbone_forward``); the outputs are those of the
        unmasked forward at the real positions. ``padded``: ``lengths``' [B, L] mask (True at
        positions ``>= lengths``), computed here when not given."""
        if lengths is not None and padded is None:
            padded = _padding_mask(lengths, h.shape[1])
        xin, z = self.ops.linear(h, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)
        x, conv_state = self.ops.causal_conv1d(
            xin.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
            initial_state=None if state is None else state.conv, activation="silu",
        )  # [B, d_inner, L]
        if lengths is not None:
            conv_state = _conv_state_at(xin.transpose(1, 2), None if state is None else state.conv, lengths,
                                        self.conv1d.weight.shape[-1])
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        dt = _mask_padded_dt(dt, padded)
        y, ssm_state = self.ops.selective_scan(
            x, dt.transpose(1, 2), self._neg_A(), B.transpose(1, 2), C.transpose(1, 2),
            self.D, z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm,
        )  # [B, d_inner, L]
        out = self.ops.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)
        return out, LayerState(conv_state, ssm_state)

    def step(self, h: torch.Tensor, state: LayerState) -> torch.Tensor:
        """h [B, D] -> out [B, D]; advances ``state`` IN PLACE. Between the projections: for few
        rows one fused op (conv update, x_proj, Falcon-Mamba's norms, dt_proj, state update in two
        launches), else the four ops (module constant :data:`FUSED_DECODE_MAX_ELEMENTS`). With
        batch-invariant ops always the four ops, whose arithmetic per row is the same at every
        batch size (the fused op's is too, but it is not the four ops' arithmetic)."""
        linear = self.ops.step_linear
        x, z = linear(h, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)
        if not self.ops.batch_invariant and x.shape[0] * x.shape[1] <= FUSED_DECODE_MAX_ELEMENTS:
            y = self.ops.mamba1_decode(
                x, z, state.conv, state.ssm, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.dt_proj.bias, self._neg_A(), self.D, bcdt_eps=self.bcdt_eps,
            )
        else:
            x = self.ops.causal_conv1d_update(x, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
            dt, B, C = self._ssm_inputs(x, linear)
            y = self.ops.selective_state_update(
                state.ssm, x, dt, self._neg_A(), B, C, self.D, z,
                dt_bias=self.dt_proj.bias, dt_softplus=True,
            )
        return linear(y, self.out_proj.weight, self.out_proj.bias)


class Mamba2Mixer(_CachedA, nn.Module):
    """The Mamba-2 mixer (SSD paper, Fig. 6): in_proj -> [z; x; B; C; dt]; [x; B; C] -> conv ->
    SiLU; SSD scan (scalar A per head, B/C shared within groups); RMSNorm(y * silu(z)); out_proj."""

    def __init__(self, config: MambaConfig, ops: Ops, **factory):
        super().__init__()
        self.ops = ops
        self.config = config
        di, h = config.d_inner, config.nheads
        fp32 = {**factory, "dtype": torch.float32}
        self.in_proj = nn.Linear(config.d_model, config.d_in_proj, bias=config.proj_bias, **factory)
        self.conv1d = _conv_params(config.conv_dim, config.d_conv, config.conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(h, **fp32))
        self.A_log = nn.Parameter(torch.empty(h, **fp32))
        self.D = nn.Parameter(torch.empty(h, **fp32))
        self.norm = Norm(di, is_rms=True, eps=config.norm_eps, **factory)  # gated, per group
        self.out_proj = nn.Linear(di, config.d_model, bias=config.proj_bias, **factory)

    @torch.no_grad()
    def init_ssm_parameters(self):
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(_inverse_softplus_dt(self.D.shape[0], self.D.device))

    def _split(self, zxbcdt: torch.Tensor):
        c = self.config
        return zxbcdt.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        """[..., conv_dim] -> x [..., H, P], B [..., G, N], C [..., G, N]."""
        c = self.config
        x, B, C = xbc.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        groups = (c.ngroups, c.d_state)
        return x.unflatten(-1, (c.nheads, c.headdim)), B.unflatten(-1, groups), C.unflatten(-1, groups)

    def _gated_norm_out(self, y: torch.Tensor, z: torch.Tensor, linear=None) -> torch.Tensor:
        c = self.config
        y = self.ops.gated_rmsnorm(y, z, self.norm.weight, self.norm.eps, c.d_inner // c.ngroups)
        return (linear or self.ops.linear)(y, self.out_proj.weight, self.out_proj.bias)

    def forward(self, h: torch.Tensor, state: LayerState | None = None, lengths: torch.Tensor | None = None,
                padded: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState]:
        """h [B, L, D] -> (out [B, L, D], final LayerState); ``state`` (if given) is read, not written.
        ``lengths`` and ``padded`` as in :meth:`Mamba1Mixer.forward`."""
        if lengths is not None and padded is None:
            padded = _padding_mask(lengths, h.shape[1])
        z, xbc_in, dt = self._split(self.ops.linear(h, self.in_proj.weight, self.in_proj.bias))
        xbc, conv_state = self.ops.causal_conv1d(
            xbc_in.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
            initial_state=None if state is None else state.conv, activation="silu",
        )  # [B, conv_dim, L]
        if lengths is not None:
            conv_state = _conv_state_at(xbc_in.transpose(1, 2), None if state is None else state.conv, lengths,
                                        self.conv1d.weight.shape[-1])
        dt = _mask_padded_dt(dt, padded)
        x, B, C = self._split_xbc(xbc.transpose(1, 2))
        y, ssm_state = self.ops.ssd_scan(
            x, dt, self._neg_A(), B, C, self.config.chunk_size, self.D,
            dt_bias=self.dt_bias, dt_softplus=True, initial_state=None if state is None else state.ssm,
        )  # [B, L, H, P]
        return self._gated_norm_out(y.flatten(-2), z), LayerState(conv_state, ssm_state)

    def step(self, h: torch.Tensor, state: LayerState) -> torch.Tensor:
        """h [B, D] -> out [B, D]; advances ``state`` IN PLACE."""
        z, xbc, dt = self._split(self.ops.step_linear(h, self.in_proj.weight, self.in_proj.bias))
        xbc = self.ops.causal_conv1d_update(xbc, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xbc)
        y = self.ops.ssd_state_update(
            state.ssm, x, dt, self._neg_A(), B, C, self.D, dt_bias=self.dt_bias, dt_softplus=True,
        )  # [B, H, P]
        return self._gated_norm_out(y.flatten(-2), z, self.ops.step_linear)


class Block(nn.Module):
    """``residual = x + residual; x = mixer(norm(residual))`` (add and norm fused, as in mamba_ssm),
    then with an MLP ``residual = x + residual; x = mlp(norm2(residual))``."""

    def __init__(self, config: MambaConfig, ops: Ops, layer_idx: int, **factory):
        super().__init__()
        self.ops = ops
        self.residual_in_fp32 = config.residual_in_fp32
        self.is_attention = layer_idx in config.attn_layer_idx
        self.norm = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)
        if self.is_attention:
            self.mixer = Attention(config, ops, **factory)
        else:
            mixer_cls = Mamba1Mixer if config.arch == "mamba1" else Mamba2Mixer
            self.mixer = mixer_cls(config, ops, **factory)
        self.norm2 = self.mlp = None
        if config.d_intermediate > 0:
            self.norm2 = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate, **factory)

    def _mlp(self, x, residual, linear):
        if self.mlp is None:
            return x, residual
        x, residual = self.norm2.add_norm(self.ops, x, residual, self.residual_in_fp32)
        return self.mlp(x, linear), residual

    def forward(self, x, residual, state: LayerState | AttnState | None, **mixer_args):
        """``mixer_args``: a Mamba mixer's ``lengths`` and ``padded`` (see ``backbone_forward``)."""
        x, residual = self.norm.add_norm(self.ops, x, residual, self.residual_in_fp32)
        x, state = self.mixer(x, state, **mixer_args)
        x, residual = self._mlp(x, residual, self.ops.linear)
        return x, residual, state

    def step(self, x, residual, state: LayerState | AttnState):
        x, residual = self.norm.add_norm(self.ops, x, residual, self.residual_in_fp32)
        return self._mlp(self.mixer.step(x, state), residual, self.ops.step_linear)


class Backbone(nn.Module):
    """Embedding, ``n_layer`` blocks and the final norm (mamba_ssm's ``MixerModel``)."""

    def __init__(self, config: MambaConfig, ops: Ops, **factory):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model, **factory)
        self.layers = nn.ModuleList(Block(config, ops, i, **factory) for i in range(config.n_layer))
        self.norm_f = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)


class MambaLMHeadModel(nn.Module):
    """A Mamba or Mamba-2 language model, possibly with attention layers and MLPs; forward only
    (parameters do not require grad).

    ``backend`` names the operator implementations (``mamba_eval.models.ops``); ``dtype`` is the
    dtype of the weights and activations (the SSM parameters stay fp32). On a real device the
    weights get mamba_ssm-style random values; on the ``meta`` device they are left unallocated
    (``mamba_eval.models.checkpoint`` materialises and fills them).
    """

    def __init__(self, config: MambaConfig, *, backend: str = "ref", device=None, dtype=None,
                 batch_invariant: bool = False):
        super().__init__()
        self.config = config
        self.ops = get_ops(backend, batch_invariant=batch_invariant)
        factory = {"device": device, "dtype": dtype}
        self.backbone = Backbone(config, self.ops, **factory)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, **factory)
        self.tie_weights()
        if self.backbone.embedding.weight.device.type != "meta":
            self.init_weights()
        self.requires_grad_(False)
        self.eval()

    def tie_weights(self):
        """Make ``lm_head.weight`` the embedding matrix when ``config.tie_embeddings``."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def init_weights(self):
        """Random weights in the spirit of mamba_ssm's initialisation (for tests and benchmarks)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.reset_parameters()
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Norm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for layer in self.backbone.layers:
            if not layer.is_attention:
                layer.mixer.init_ssm_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    @property
    def has_attention(self) -> bool:
        """Whether some layers are attention: their state is a key/value cache that grows with
        the sequence, and ``allocate_state`` needs the longest sequence it must hold."""
        return self.config.has_attention

    def _check_state(self, state: ModelState, batch_size: int):
        if len(state) != self.config.n_layer:
            raise ValueError(f"state has {len(state)} layers, the model has {self.config.n_layer}")
        if state and state[0].batch_size != batch_size:
            raise ValueError(f"state is for batch size {state[0].batch_size}, input_ids for {batch_size}")
        for i, (layer, layer_state) in enumerate(zip(self.backbone.layers, state)):
            expected = AttnState if layer.is_attention else LayerState
            if not isinstance(layer_state, expected):
                raise ValueError(
                    f"state of layer {i} is a {type(layer_state).__name__}, the layer needs a {expected.__name__}"
                )

    def backbone_forward(
        self, input_ids: torch.Tensor, state: ModelState | None = None, return_state: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ModelState | None]:
        """input_ids [B, L] -> (hidden [B, L, D] after norm_f in model dtype, final state or None).

        ``state`` is the state before ``input_ids[:, 0]`` (zeros when None); it is not modified.

        ``lengths`` (with ``return_state``): a LongTensor [B] on the model's device of the rows'
        real lengths, ``1 <= lengths[b] <= L`` (not checked: that would read device values), the
        rest of a row being padding. The returned state of row b is then its state after
        position ``lengths[b] - 1``, the same bits as the final state of the row in a forward of
        its own length: Δ is set to ``-inf`` before its bias and softplus at the padded positions
        (softplus gives exactly 0 there, and the scan carries the state through unchanged) and
        the conv state is gathered from the conv inputs before ``lengths[b]``. Hidden states at
        real positions are those without ``lengths`` (the model is causal). One exception: the
        Mamba-2 reference scan (``kernels.ssd.ssd_scan_ref``) from a nonzero initial ``state``
        agrees to fp32 rounding only (it sums the chunks' contributions in one product whose
        length is the chunk count); from zeros, and in the Triton kernels, bits agree (tested in
        ``tests/test_lengths.py``). Not for models with attention layers (their caches would
        hold the padding): ValueError.
        """
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if state is not None:
            self._check_state(state, input_ids.shape[0])
        padded = None
        if lengths is not None:
            if self.has_attention:
                raise ValueError(
                    "lengths is not supported for models with attention layers: their key/value caches "
                    "would hold the padding; run rows of equal length instead"
                )
            if not return_state:
                raise ValueError("lengths is only meaningful with return_state=True")
            if lengths.ndim != 1 or lengths.shape[0] != input_ids.shape[0] or lengths.dtype != torch.long:
                raise ValueError(
                    f"lengths must be a LongTensor [B={input_ids.shape[0]}], got {lengths.dtype} {tuple(lengths.shape)}"
                )
            if lengths.device != input_ids.device:
                raise ValueError(f"lengths is on {lengths.device}, input_ids on {input_ids.device}")
            padded = _padding_mask(lengths, input_ids.shape[1])
        x, residual = F.embedding(input_ids, self.backbone.embedding.weight), None
        final_states = [] if return_state else None
        mixer_args = {} if lengths is None else {"lengths": lengths, "padded": padded}
        for i, layer in enumerate(self.backbone.layers):
            x, residual, layer_state = layer(x, residual, None if state is None else state[i], **mixer_args)
            if return_state:
                final_states.append(layer_state)
        hidden, _ = self.backbone.norm_f.add_norm(self.ops, x, residual, self.config.residual_in_fp32)
        return hidden, final_states

    def lm_logits(self, hidden: torch.Tensor, linear=None) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] in fp32 (matmul in the weight dtype), over all stored
        rows; ``linear`` (default ``ops.linear``) is the matrix product used."""
        weight = self.lm_head.weight
        return (linear or self.ops.linear)(hidden.to(weight.dtype), weight).float()

    def forward(
        self, input_ids: torch.Tensor, state: ModelState | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, ModelState | None]:
        """input_ids [B, L] -> (logits [B, L, V] fp32, final state if ``return_state`` else None)."""
        hidden, final_state = self.backbone_forward(input_ids, state, return_state)
        return self.lm_logits(hidden), final_state

    def allocate_state(self, batch_size: int, max_length: int | None = None,
                       state_dtype: torch.dtype = torch.float32) -> ModelState:
        """A zero state (the state before any token) for ``batch_size`` sequences.

        ``max_length``: the most positions a sequence will reach (prompt and generated tokens);
        required when the model has attention layers, whose key/value caches are preallocated
        for that many positions. Ignored otherwise (a recurrent state does not grow).
        ``state_dtype``: storage of the SSM states (fp32 by default; the step's math is fp32
        either way). A 16-bit state halves the bytes a decoding step reads and writes, which
        is what bounds large-batch decoding; mamba_ssm's inference cache keeps it in the
        model's dtype.
        """
        c = self.config
        if c.has_attention and (max_length is None or max_length < 1):
            raise ValueError(
                f"this model has attention layers: allocate_state needs max_length, the number of positions "
                f"their key/value caches must hold (got {max_length!r})"
            )
        conv_shape = (batch_size, c.conv_dim, c.d_conv - 1)
        if c.arch == "mamba1":
            ssm_shape = (batch_size, c.d_inner, c.d_state)
        else:
            ssm_shape = (batch_size, c.nheads, c.headdim, c.d_state)
        states: ModelState = []
        for layer in self.backbone.layers:
            if layer.is_attention:
                states.append(AttnState.zeros(batch_size, c.attn, max_length, dtype=self.dtype, device=self.device))
            else:
                states.append(LayerState(
                    torch.zeros(conv_shape, dtype=self.dtype, device=self.device),
                    torch.zeros(ssm_shape, dtype=state_dtype, device=self.device),
                ))
        return states

    def step(self, input_ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """One token per sequence: input_ids [B] -> logits [B, V] fp32; advances ``state`` IN PLACE."""
        if input_ids.ndim != 1:
            raise ValueError(f"step takes one token per sequence, input_ids [B]; got shape {tuple(input_ids.shape)}")
        self._check_state(state, input_ids.shape[0])
        x, residual = F.embedding(input_ids, self.backbone.embedding.weight), None
        for layer, layer_state in zip(self.backbone.layers, state):
            x, residual = layer.step(x, residual, layer_state)
        hidden, _ = self.backbone.norm_f.add_norm(self.ops, x, residual, self.config.residual_in_fp32)
        return self.lm_logits(hidden, self.ops.step_linear)
