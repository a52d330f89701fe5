"""Small building blocks of a layer: the norm's parameters, the gated MLP and the mixture of experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.kernels.moe import moe_experts_ref
from mamba_eval.models.ops import Ops


class Norm(nn.Module):
    """Parameters of an RMSNorm (weight) or LayerNorm (weight, bias); applied by ``ops.add_norm``
    (fused with the residual add) or, for Mamba-2's gated norm, by ``ops.gated_rmsnorm``."""

    def __init__(self, dim: int, is_rms: bool, eps: float, **factory):
        super().__init__()
        self.is_rms, self.eps = is_rms, eps
        self.weight = nn.Parameter(torch.empty(dim, **factory))
        self.bias = None if is_rms else nn.Parameter(torch.empty(dim, **factory))

    def add_norm(self, ops: Ops, x, residual, residual_in_fp32: bool):
        return ops.add_norm(x, residual, self.weight, self.bias, self.eps, residual_in_fp32, self.is_rms)


class GatedMLP(nn.Module):
    """mamba_ssm's ``GatedMLP``: ``fc2(y * silu(gate))`` with ``[y; gate] = fc1(x)``, no biases."""

    def __init__(self, d_model: int, hidden: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, **factory)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, **factory)

    def forward(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        y, gate = linear(x, self.fc1.weight).chunk(2, dim=-1)
        return linear(y * F.silu(gate), self.fc2.weight)

    step = forward  # a decoding step: the same products


class ReluSquaredMLP(nn.Module):
    """``fc2(relu(fc1(x))^2)`` (Nemotron-H's MLP), biases optional."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, **factory):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        return linear(torch.square(F.relu(linear(x, self.fc1.weight, self.fc1.bias))), self.fc2.weight, self.fc2.bias)

    step = forward


class MoE(nn.Module):
    """A mixture of gated-MLP experts (``MoEConfig``), and the shared expert when there is one.

    Parameters: ``router.weight`` [E, D]; ``fc1`` [E, 2 I, D] (rows [y; gate] per expert, as
    GatedMLP's) and ``fc2`` [E, D, I]; ``shared.fc1/fc2`` (a GatedMLP). A token's output is the sum,
    in expert order, of its ``top_k`` experts' outputs times their routing weights (the softmax of
    the chosen fp32 logits, rounded to the activation dtype as transformers does), plus the shared
    expert's. Each expert's products run on the rows routed to it, with the model's ``linear``: a
    token's result does not depend on which other tokens share the batch when ``linear`` is
    batch-invariant (on a GPU under the model's invariance policy). ``ops``' ``moe_experts`` runs
    the routed experts: the reference loop, or the grouped Triton kernel, which is batch-invariant
    itself and has no host synchronisation, so that decoding steps use it too. Under the CPU's
    invariance policy (``ops.invariance.pads_batches``) every expert runs on every row instead:
    there a product's rows are exact only in batches shaped by the engine, which an expert's share
    of the rows is not. Without ``ops``: the references, routed."""

    def __init__(self, d_model: int, cfg, ops: Ops | None = None, **factory):
        super().__init__()
        self.cfg, self.top_k = cfg, cfg.top_k
        self.dense = ops is not None and ops.invariance.pads_batches
        self.experts_fn = moe_experts_ref if ops is None else ops.moe_experts
        # The reference loop synchronises with the host (which experts have rows): steps that a
        # CUDA graph holds run every expert instead, unless the kernel serves the experts.
        self.routed_steps = ops is not None and "moe_experts" in ops.kernels and not self.dense
        E, gated = cfg.num_experts, cfg.experts == "gated"
        sigmoid = cfg.router == "sigmoid"
        # Nemotron-H keeps its router in fp32, with the correction bias of the choice.
        router_factory = {**factory, "dtype": torch.float32} if sigmoid else factory
        self.router = nn.Linear(d_model, E, bias=False, **router_factory)
        self.router_bias = nn.Parameter(torch.empty(E, **router_factory)) if sigmoid else None
        d_in = cfg.d_latent or d_model  # the experts' width
        self.latent_in = self.latent_out = None
        if cfg.d_latent:
            self.latent_in = nn.Linear(d_model, d_in, bias=cfg.shared_bias, **factory)
            self.latent_out = nn.Linear(d_in, d_model, bias=cfg.shared_bias, **factory)
        self.fc1 = nn.Parameter(torch.empty(E, (2 if gated else 1) * cfg.d_expert, d_in, **factory))
        self.fc2 = nn.Parameter(torch.empty(E, d_in, cfg.d_expert, **factory))
        self.shared = None
        if cfg.d_shared > 0:
            self.shared = (GatedMLP(d_model, cfg.d_shared, **factory) if gated else
                           ReluSquaredMLP(d_model, cfg.d_shared, cfg.shared_bias, **factory))

    def reset_parameters(self):
        for w in (self.fc1, self.fc2):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        if self.router_bias is not None:
            nn.init.zeros_(self.router_bias)

    def active_fraction(self) -> float:
        """The share of the expert weights one token runs (for cost estimates)."""
        return self.top_k / self.fc1.shape[0]

    def _route(self, x, linear):
        """(top_k expert indices [N, k], their weights [N, k]: x's dtype for softmax, fp32 for sigmoid)."""
        c = self.cfg
        if c.router == "softmax":
            top_logits, top_idx = linear(x, self.router.weight).float().topk(self.top_k, dim=-1)
            return top_idx, torch.softmax(top_logits, dim=-1).to(x.dtype)
        if c.router == "softmax_all":
            top_p, top_idx = torch.softmax(linear(x, self.router.weight).float(), dim=-1).topk(self.top_k, dim=-1)
            return top_idx, top_p.to(x.dtype)
        scores = torch.sigmoid(linear(x.float(), self.router.weight))
        choice = scores + self.router_bias
        if c.n_group > 1:
            groups = choice.view(-1, c.n_group, c.num_experts // c.n_group)
            best = groups.topk(2, dim=-1)[0].sum(-1).topk(c.topk_group, dim=-1)[1]  # [N, topk_group]
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).view(-1, c.num_experts)
        top_idx = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, top_idx)
        if c.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return top_idx, weights * c.scaling

    def _expert(self, e: int, x, linear):
        if self.cfg.experts == "relu2":
            return linear(torch.square(F.relu(linear(x, self.fc1[e]))), self.fc2[e])
        y, gate = linear(x, self.fc1[e]).chunk(2, dim=-1)
        return linear(y * F.silu(gate), self.fc2[e])

    def _enter(self, x, linear):
        """The experts' input: x, or its latent projection."""
        return x if self.latent_in is None else linear(x, self.latent_in.weight, self.latent_in.bias)

    def _finish(self, out, x, linear, shape):
        """The routed experts' fp32 sum (in the latent space, if any) -> the layer's output."""
        if self.latent_out is not None:
            out = linear(out.to(x.dtype), self.latent_out.weight, self.latent_out.bias).float()
        if self.shared is not None:
            out += self.shared(x, linear).float()
        return out.to(x.dtype).reshape(shape)

    def forward(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        return self._all_experts(x, linear) if self.dense else self._routed(x, linear)

    def step(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        """A decoding step: routed through the kernel when it serves the experts, else every expert."""
        return self._routed(x, linear) if self.routed_steps else self._all_experts(x, linear)

    def _routed(self, x: torch.Tensor, linear) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_idx, weights = self._route(x, linear)
        out = self.experts_fn(self._enter(x, linear), self.fc1, self.fc2, top_idx, weights, self.cfg.experts,
                              linear=linear)
        return self._finish(out, x, linear, shape)

    def _all_experts(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        """A decoding step without host synchronisation or data-dependent shapes (a CUDA graph can
        hold it): every expert runs on every row, weighted 0 where not chosen. Per-row products
        are those of ``forward`` and the zero terms add exactly nothing, so the bits are
        ``forward``'s (with a batch-invariant ``linear``)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_idx, weights = self._route(x, linear)
        xe = self._enter(x, linear)
        out = torch.zeros(xe.shape, dtype=torch.float32, device=x.device)
        for e in range(self.fc1.shape[0]):
            w = (weights * (top_idx == e)).sum(-1, keepdim=True)  # the expert's weight, 0 if not chosen
            out += (self._expert(e, xe, linear) * w).float()
        return self._finish(out, x, linear, shape)
