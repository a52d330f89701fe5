"""What the readers of transformers' hybrid families share: the weight map and the rotary fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mamba_eval.models.config_fields import CheckpointError, Fields, generic_config_keys


@dataclass(frozen=True)
class WeightMap:
    """Stored names -> ours: ``renames`` (regex, replacement) applied to each key, and ``fusions``
    (regex with a group ``part``, the target, the parts in order): the stored tensors of one target
    concatenated along dim 0 in that order. Several stored tensors may map to one of ours (aliases
    of a shared weight, as Zamba2's shared blocks may be stored) only if they are equal."""

    renames: tuple[tuple[str, str], ...]
    fusions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    swap_halves: tuple[str, ...] = ()  # stored keys whose two halves of rows (dim -2) we store the other way round
    drops: tuple[str, ...] = ()  # stored keys that are not part of the language model
    # (regex with a numeric group ``part``, target): tensors stacked in order, matched on the names
    # after the renames and fusions
    stacks: tuple[tuple[str, str], ...] = ()
    # (regex, fn(tensor) -> tensor) applied to a stored tensor before anything else: multipliers
    # that a family applies around a linear map, folded into its weight and bias
    transforms: tuple[tuple[str, Callable], ...] = ()

    def apply(self, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        stacked: dict[str, dict[int, torch.Tensor]] = {}
        order: dict[str, tuple[str, ...]] = {}
        for key, tensor in state.items():
            if any(re.match(pattern, key) for pattern in self.drops):
                continue
            for pattern, fn in self.transforms:
                if re.match(pattern, key):
                    tensor = fn(tensor)
            if any(re.match(pattern, key) for pattern in self.swap_halves):
                first, second = tensor.chunk(2, dim=-2)
                tensor = torch.cat([second, first], dim=-2)
            for pattern, target, parts in self.fusions:
                m = re.match(pattern, key)
                if m:
                    name = m.expand(target)
                    _put(pending.setdefault(name, {}), m.group("part"), tensor, f"the {m.group('part')!r} part of "
                                                                                 f"{name!r}", where)
                    order[name] = parts
                    break
            else:
                ours = key
                for pattern, replacement in self.renames:
                    ours = re.sub(pattern, replacement, ours)
                _put(out, ours, tensor, repr(ours), where)
        for name, got in pending.items():
            missing = [p for p in order[name] if p not in got]
            if missing:
                raise CheckpointError(f"{where}: the checkpoint lacks the {missing[0]!r} part of {name!r}")
            out[name] = torch.cat([got[p] for p in order[name]], dim=0)
        for key in list(out):  # stacks gather the renamed and fused tensors
            stack = next(((m, target) for pattern, target in self.stacks if (m := re.match(pattern, key))), None)
            if stack is not None:
                m, target = stack
                stacked.setdefault(m.expand(target), {})[int(m.group("part"))] = out.pop(key)
        for name, got in stacked.items():
            missing = sorted(set(range(max(got) + 1)) - set(got))
            if missing:
                raise CheckpointError(f"{where}: the checkpoint lacks part {missing[0]} of {name!r}")
            out[name] = torch.stack([got[i] for i in range(len(got))])
        return out


def _put(into: dict, key: str, tensor: torch.Tensor, what: str, where: Path) -> None:
    if key in into and not (into[key].shape == tensor.shape and torch.equal(into[key], tensor)):
        raise CheckpointError(f"{where}: the checkpoint stores {what} twice, with different values")
    into[key] = tensor


def rope(f: Fields) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) as transformers' BambaConfig resolves them: from
    ``rope_parameters`` (transformers 5) or the older top-level ``rope_theta``; the factor is 0.5
    unless ``rope_parameters`` holds one (BambaConfig sets it there by default)."""
    params = f.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            f.fail("rope_parameters", f"must be an object, got {params!r}")
        p = Fields(params, f.where, prefix="rope_parameters.")
        p.unsupported_unless("rope_type", lambda v: v == "default", "scaled rotary embedding")
        return p.float("rope_theta", 10000.0), p.float("partial_rotary_factor", 0.5)
    f.unsupported_unless("rope_scaling", lambda v: v is None, "scaled rotary embedding")
    return f.float("rope_theta", 10000.0), 0.5


# Pieces of transformers' decoder naming that several families share (our names on the right).
EMBED = (r"^model\.embed_tokens\.", "backbone.embedding.")
INPUT_NORM = (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm.")


def final_norm(name: str) -> tuple[str, str]:
    return (rf"^model\.{name}\.", "backbone.norm_f.")


def ff_norm(name: str) -> tuple[str, str]:
    """The norm before the MLP (``pre_ff_layernorm``, ``post_attention_layernorm``)."""
    return (rf"^model\.layers\.(\d+)\.{name}\.", r"backbone.layers.\1.norm2.")


def mamba_to(ours: str = "mixer") -> tuple[str, str]:
    """The Mamba layer's module (``mamba.*``) as ours (the mixer, or a part of it)."""
    return (r"^model\.layers\.(\d+)\.mamba\.", rf"backbone.layers.\1.{ours}.")


def attention(ours: str = "mixer") -> tuple[tuple[str, str], tuple[str, str, tuple[str, ...]]]:
    """(the rename of ``self_attn.o_proj``, the fusion of ``self_attn.{q,k,v}_proj`` into in_proj)."""
    return ((r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", rf"backbone.layers.\1.{ours}.out_proj."),
            (r"^model\.layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)$",
             rf"backbone.layers.\1.{ours}.in_proj.\3", ("q", "k", "v")))


def gated_mlp() -> tuple[tuple[str, str], tuple[str, str, tuple[str, ...]]]:
    """(the rename of ``feed_forward.down_proj``, the fusion of its up and gate projections into our
    fc1, whose rows are [y; gate])."""
    return ((r"^model\.layers\.(\d+)\.feed_forward\.down_proj\.", r"backbone.layers.\1.mlp.fc2."),
            (r"^model\.layers\.(\d+)\.feed_forward\.(?P<part>up|gate)_proj\.weight$",
             r"backbone.layers.\1.mlp.fc1.weight", ("up", "gate")))


def check_known(f: Fields, read: set, ignored: set, config_class: str) -> None:
    """Refuse a field that is neither read nor known to be irrelevant, and an activation other than
    SiLU where the family has ``hidden_act``."""
    unknown = sorted(set(f.raw) - read - ignored - generic_config_keys())
    if unknown:
        f.fail(unknown[0], f"is not a known setting of transformers' {config_class}")
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")


def mamba2_fields(f: Fields, d_inner: int) -> dict:
    """The ``mamba_*`` Mamba-2 fields that Bamba, Granite 4.0-H and Falcon-H1 share (transformers'
    defaults), as keyword arguments of ``Mamba2Config`` / ``mamba_stack``; ``mamba_d_head`` "auto"
    is the SSM width ``d_inner`` over ``mamba_n_heads``."""
    n_heads, d_head = f.int("mamba_n_heads", 128), f.get("mamba_d_head", "auto")
    if n_heads < 1 or d_inner % n_heads:
        f.fail("mamba_n_heads", f"= {n_heads} does not divide the SSM width {d_inner}")
    headdim = d_inner // n_heads if d_head == "auto" else f.int("mamba_d_head")
    if headdim * n_heads != d_inner:
        f.fail("mamba_d_head", f"= {d_head} times mamba_n_heads = {n_heads} is not the SSM width {d_inner}")
    return dict(d_state=f.int("mamba_d_state", 256), d_conv=f.int("mamba_d_conv", 4), headdim=headdim,
                ngroups=f.int("mamba_n_groups", 1), chunk_size=f.int("mamba_chunk_size", 256),
                conv_bias=f.bool("mamba_conv_bias", True), proj_bias=f.bool("mamba_proj_bias", False))
