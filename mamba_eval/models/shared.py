"""Transformer blocks that several layers share (Zamba2's), and a layer's use of one.

A shared block (:class:`SharedBlock`, ``SharedBlockConfig``) is stored once and run by every layer
that uses it (``LayerConfig.shared``), each use with its own low-rank adapters, its own linear map
of the output and its own key/value cache (the inputs differ from use to use). Parameters::

    backbone.shared.b.norm_in        [2 D]        RMSNorm of [stream; embedding]
    backbone.shared.b.attn           attention over 2 D channels: in_proj [q; k; v], out_proj [D, H P]
    backbone.shared.b.norm_ff        [D]          RMSNorm before the MLP
    backbone.shared.b.fc1            [2 I, D]     rows [gate; up] (bias optional)
    backbone.shared.b.fc2            [D, I]

    backbone.layers.i.shared_use.attn_down         [3 r, 2 D]  the q, k, v adapters' first maps, stacked
    backbone.layers.i.shared_use.{q,k,v}_up        [H P or Hkv P, r]
    backbone.layers.i.shared_use.mlp_down, mlp_up  [r, D], [2 I, r]
    backbone.layers.i.shared_use.linear            [D, D]

For a use on the stream ``h`` and the embeddings ``e``::

    z = norm_in([h; e]);  a = norm_ff(attn(z))      q/k/v = in_proj(z) + up(down(z)) per use
    [gate; up] = fc1(a) + mlp_up(mlp_down(a));  t = linear(fc2(gelu(gate) * up))

Every product is rounded to the model dtype as transformers' ``Zamba2`` modules round them. The
adapters stay low-rank products (folding them into per-use copies of the block's weights would
multiply the block's memory by the number of uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.config import AttnConfig, SharedBlockConfig, SharedUseConfig
from mamba_eval.models.layers import Norm
from mamba_eval.models.mixers.attention import Attention, AttnState, attn_zero_state
from mamba_eval.models.ops import Ops


class SharedUse(nn.Module):
    """One layer's adapters and output map for its use of a shared block (module docstring)."""

    def __init__(self, cfg: SharedUseConfig, block: SharedBlockConfig, d_model: int, **factory):
        super().__init__()
        self.cfg, self.attn_cfg = cfg, block.attn
        a, r = block.attn, cfg.rank
        self.attn_down = self.q_up = self.k_up = self.v_up = None
        if cfg.attn_adapters:
            self.attn_down = nn.Linear(2 * d_model, 3 * r, bias=False, **factory)
            kv = a.num_heads_kv * a.head_dim
            self.q_up, self.k_up, self.v_up = (nn.Linear(r, n, bias=False, **factory) for n in (a.out_dim, kv, kv))
        self.mlp_down = nn.Linear(d_model, r, bias=False, **factory)
        self.mlp_up = nn.Linear(r, 2 * block.d_intermediate, bias=False, **factory)
        self.linear = nn.Linear(d_model, d_model, bias=False, **factory)

    def qkv_adapter(self, z: torch.Tensor, linear) -> torch.Tensor:
        """The adapters' addend to the q/k/v projection of ``z`` [..., 2 D]."""
        u = linear(z, self.attn_down.weight).chunk(3, dim=-1)
        return torch.cat([linear(ui, up.weight) for ui, up in zip(u, (self.q_up, self.k_up, self.v_up))], dim=-1)

    def mlp_adapter(self, a: torch.Tensor, linear) -> torch.Tensor:
        return linear(linear(a, self.mlp_down.weight), self.mlp_up.weight)

    # The state the use adds to its layer's: the attention's key/value cache.
    def zero_state(self, batch_size: int, *, capacity, dtype, device, **_) -> AttnState:
        return attn_zero_state(self.attn_cfg, batch_size, capacity, dtype=dtype, device=device)

    def kv_bytes(self, elem: int) -> int:
        return 2 * self.attn_cfg.num_heads_kv * self.attn_cfg.head_dim * elem

    def activation_bytes(self) -> int:
        a: AttnConfig = self.attn_cfg
        return 4 * (2 * a.qkv_dim + 2 * a.out_dim + 3 * self.mlp_up.out_features)


class SharedBlock(nn.Module):
    """A shared transformer block (module docstring); :meth:`forward` and :meth:`step` run one use."""

    def __init__(self, cfg: SharedBlockConfig, d_model: int, eps: float, ops: Ops, **factory):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.norm_in = Norm(2 * d_model, is_rms=True, eps=eps, **factory)
        self.attn = Attention(cfg.attn, 2 * d_model, ops, d_out=d_model, **factory)
        self.norm_ff = Norm(d_model, is_rms=True, eps=eps, **factory)
        self.fc1 = nn.Linear(d_model, 2 * cfg.d_intermediate, bias=cfg.mlp_bias, **factory)
        self.fc2 = nn.Linear(cfg.d_intermediate, d_model, bias=cfg.mlp_bias, **factory)

    def _input(self, h, embedded):
        z, _ = self.norm_in.add_norm(self.ops, torch.cat([h.to(embedded.dtype), embedded], dim=-1), None, False)
        return z

    def _mlp(self, a, use: SharedUse, linear):
        a, _ = self.norm_ff.add_norm(self.ops, a, None, False)
        gate, up = (linear(a, self.fc1.weight, self.fc1.bias) + use.mlp_adapter(a, linear)).chunk(2, dim=-1)
        y = linear(F.gelu(gate) * up, self.fc2.weight, self.fc2.bias)
        return linear(y, use.linear.weight)

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, use: SharedUse, state: AttnState | None
                ) -> tuple[torch.Tensor, AttnState]:
        """h, embedded [B, L, D] -> (the use's output t [B, L, D], its key/value cache)."""
        adapter = use.qkv_adapter if use.cfg.attn_adapters else None
        a, attn_state = self.attn(self._input(h, embedded), state, adapter=adapter)
        return self._mlp(a, use, self.ops.linear), attn_state

    def step(self, h: torch.Tensor, embedded: torch.Tensor, use: SharedUse, state: AttnState) -> torch.Tensor:
        """h, embedded [B, D] -> t [B, D]; appends to ``state`` IN PLACE."""
        adapter = use.qkv_adapter if use.cfg.attn_adapters else None
        a = self.attn.step(self._input(h, embedded), state, adapter=adapter)
        return self._mlp(a, use, self.ops.step_linear)
