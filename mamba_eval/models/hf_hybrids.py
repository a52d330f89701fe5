"""transformers' Mamba hybrid families: their ``config.json`` as a ``ModelConfig`` of blocks, and
their weight names as ours. ``mamba_eval.models.formats`` dispatches here by ``model_type``.

- **Bamba** (``model_type`` "bamba", ``BambaForCausalLM``; ibm-ai-platform/Bamba-9B): Mamba-2 layers,
  grouped-query attention at ``attn_layer_indices`` (rotary embedding on the first
  ``partial_rotary_factor`` of each head, 0.5 unless ``rope_parameters`` says otherwise, GPT-NeoX
  halves), a gated MLP after every mixer (``down(silu(gate(x)) * up(x))``), RMSNorm everywhere,
  the residual stream in the model dtype. Mamba-2 fields ``mamba_n_heads, mamba_d_head,
  mamba_n_groups, mamba_d_state, mamba_d_conv, mamba_expand, mamba_chunk_size, mamba_conv_bias,
  mamba_proj_bias``; the gated norm groups by ``mamba_n_groups`` with eps ``rms_norm_eps``.
  Weights ``model.embed_tokens``, ``model.layers.N.{input_layernorm, pre_ff_layernorm, mamba.*,
  self_attn.{q,k,v,o}_proj, feed_forward.{gate,up,down}_proj}``, ``model.final_layernorm``,
  ``lm_head``: q/k/v become the attention's ``in_proj`` rows and [up; gate] the MLP's ``fc1``.
- **Granite 4.0-H** (``model_type`` "granitemoehybrid", ``GraniteMoeHybridForCausalLM``): Mamba-2 and
  attention layers by ``layer_types`` ("mamba"/"linear_attention", "attention"/"full_attention";
  the older key ``layers_block_type``), attention with no positional encoding unless
  ``position_embedding_type`` is "rope" (then full rotary), ``attention_multiplier`` as its scale;
  after every mixer a mixture of experts (``num_local_experts``, ``num_experts_per_tok``, experts of
  width ``intermediate_size``, a shared expert of ``shared_intermediate_size``) or, with no experts,
  the shared MLP alone; ``embedding_multiplier``, ``residual_multiplier`` and 1 / ``logits_scaling``
  as the model's multipliers. Weights ``model.layers.N.{input_layernorm, post_attention_layernorm,
  mamba.*, self_attn.*, block_sparse_moe.{router.layer, input_linear, output_linear},
  shared_mlp.{input_linear, output_linear}}``, ``model.norm``; Granite's gated rows are [gate; up],
  ours [y; gate], so their halves swap.
- **Nemotron-H** (``model_type`` "nemotron_h", ``NemotronHForCausalLM``): one sublayer per block after
  the block's norm, by ``hybrid_override_pattern`` (``M`` Mamba-2, ``*`` attention, ``-`` MLP, ``E``
  mixture of experts) or ``layers_block_type``; the Mamba-2 width is ``mamba_num_heads *
  mamba_head_dim``; attention has no positional encoding and no biases; the MLP is
  ``down(relu(up(x))^2)`` (a mixer of kind "mlp"); the MoE layers (kind "moe") have squared-ReLU
  experts, a shared expert and the sigmoid router with a correction bias and expert groups; the LM
  head is never tied. Weights are ours but
  ``backbone.embeddings``, ``mixer.{q,k,v,o}_proj``, ``mixer.{up,down}_proj``, ``mixer.gate.{weight,
  e_score_correction_bias}``, ``mixer.experts.J.{up,down}_proj`` (stacked) and
  ``mixer.shared_experts.*``; ``mtp.*`` (the
  multi-token-prediction head) is not read.
- **Falcon-H1** (``model_type`` "falcon_h1", ``FalconH1ForCausalLM``): every block runs attention (full
  rotary) and a Mamba-2 SSM of ``mamba_d_ssm`` channels side by side on its normed input and sums
  them (a mixer of kind "parallel"), then a gated MLP; the SSM's gated norm is absent unless
  ``mamba_rms_norm`` (then before or after the gate by ``mamba_norm_before_gate``); the µP
  multipliers around linear maps are folded into the weights when they are read
  (:func:`_falcon_h1_weights`), the embedding and LM-head multipliers kept as the model's.
- **Jamba** (``model_type`` "jamba", ``JambaForCausalLM``): Mamba-1 layers with weighted RMSNorms of Δ,
  B and C (``mamba.{dt,b,c}_layernorm``), attention where ``i % attn_layer_period ==
  attn_layer_offset`` (no positional encoding), a gated MLP after every mixer or, where ``i %
  expert_layer_period == expert_layer_offset``, experts routed by the softmax over all of them
  (the chosen probabilities not renormalised); per-expert ``feed_forward.experts.J.{gate,up,down}_proj``
  are fused and stacked.

Each family is a reader of its config (known fields read, fields of training or of the runtime
ignored, anything else refused with one line naming it) and a table of weight names
(:class:`WeightMap`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from mamba_eval.models.config import (
    AttnConfig, LayerConfig, Mamba1Config, Mamba2Config, MLPConfig, MLPMixerConfig, ModelConfig, MoEConfig, MoEMixerConfig,
    ParallelConfig, mamba_stack,
)
from mamba_eval.models.config_fields import CheckpointError, Fields, generic_config_keys, is_default_dt_limit


@dataclass(frozen=True)
class WeightMap:
    """Stored names -> ours: ``renames`` (regex, replacement) applied to each key, and ``fusions``
    (regex with a group ``part``, the target, the parts in order): the stored tensors of one target
    concatenated along dim 0 in that order."""

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
                    pending.setdefault(name, {})[m.group("part")] = tensor
                    order[name] = parts
                    break
            else:
                ours = key
                for pattern, replacement in self.renames:
                    ours = re.sub(pattern, replacement, ours)
                out[ours] = tensor
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


# ----------------------------------------------------------------------------- Bamba

_BAMBA_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "attn_layer_indices",
    "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
    "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "time_step_limit", "rope_parameters", "rope_theta",
    "rope_scaling", "partial_rotary_factor", "attention_bias", "mlp_bias",
}
# Fields of training, initialisation, generation defaults or the runtime.
_BAMBA_IGNORED = {
    "initializer_range", "use_cache", "num_logits_to_keep", "max_position_embeddings", "attention_dropout",
    "z_loss_coefficient", "time_step_min", "time_step_max", "time_step_floor", "pad_token_id", "bos_token_id",
    "eos_token_id",
}

_BAMBA_WEIGHTS = WeightMap(
    renames=(
        (r"^model\.embed_tokens\.", "backbone.embedding."),
        (r"^model\.final_layernorm\.", "backbone.norm_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm."),
        (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.", r"backbone.layers.\1.norm2."),
        (r"^model\.layers\.(\d+)\.mamba\.", r"backbone.layers.\1.mixer."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"backbone.layers.\1.mixer.out_proj."),
        (r"^model\.layers\.(\d+)\.feed_forward\.down_proj\.", r"backbone.layers.\1.mlp.fc2."),
    ),
    fusions=(
        (r"^model\.layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)$",
         r"backbone.layers.\1.mixer.in_proj.\3", ("q", "k", "v")),
        (r"^model\.layers\.(\d+)\.feed_forward\.(?P<part>up|gate)_proj\.weight$",
         r"backbone.layers.\1.mlp.fc1.weight", ("up", "gate")),  # our fc1 rows: [y; gate]
    ),
)


def _rope(f: Fields) -> tuple[float, float]:
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


def bamba_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _BAMBA_READ - _BAMBA_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of transformers' BambaConfig")
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    f.unsupported_unless("mlp_bias", lambda v: v is False, "MLP biases")
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    expand, n_heads = f.int("mamba_expand", 2), f.int("mamba_n_heads", 128)
    d_head = f.get("mamba_d_head", "auto")
    if n_heads < 1 or (expand * hidden) % n_heads:
        f.fail("mamba_n_heads", f"= {n_heads} does not divide mamba_expand * hidden_size = {expand * hidden}")
    headdim = (expand * hidden) // n_heads if d_head == "auto" else f.int("mamba_d_head")
    if headdim * n_heads != expand * hidden:
        f.fail("mamba_d_head", f"= {d_head} times mamba_n_heads = {n_heads} is not mamba_expand * hidden_size = "
               f"{expand * hidden}")
    heads = f.int("num_attention_heads", 32)
    if heads < 1:
        f.fail("num_attention_heads", f"must be positive, got {heads}")
    if f.get("head_dim") is None and hidden % heads:
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden} and head_dim is missing")
    head_dim = f.int("head_dim", hidden // heads)
    theta, factor = _rope(f)
    idx = f.get("attn_layer_indices") or []
    if not isinstance(idx, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layer
                                        for i in idx):
        f.fail("attn_layer_indices", f"must list layer indices in [0, {n_layer}), got {idx!r}")
    bias = f.bool("attention_bias", False)
    try:
        attn = AttnConfig(num_heads=heads, num_heads_kv=f.int("num_key_value_heads", 8), head_dim=head_dim,
                          rotary_emb_dim=int(head_dim * factor), rotary_emb_base=theta, qkv_proj_bias=bias,
                          out_proj_bias=bias)
        return mamba_stack(
            arch="mamba2", d_model=hidden, n_layer=n_layer, vocab_size=f.int("vocab_size", required=True),
            d_state=f.int("mamba_d_state", 256), d_conv=f.int("mamba_d_conv", 4), expand=expand, headdim=headdim,
            ngroups=f.int("mamba_n_groups", 1), chunk_size=f.int("mamba_chunk_size", 256),
            conv_bias=f.bool("mamba_conv_bias", True), proj_bias=f.bool("mamba_proj_bias", False), rms_norm=True,
            norm_eps=f.float("rms_norm_eps", 1e-5), residual_in_fp32=False,
            tie_embeddings=f.bool("tie_word_embeddings", False),
            d_intermediate=f.int("intermediate_size", 14336), attn_layer_idx=sorted(set(idx)), attn=attn)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- Granite 4.0-H

_GRANITE_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_theta",
    "rope_scaling", "attention_bias", "embedding_multiplier", "logits_scaling", "residual_multiplier",
    "attention_multiplier", "num_local_experts", "num_experts_per_tok", "shared_intermediate_size",
    "position_embedding_type", "layer_types", "layers_block_type", "normalization_function", "mamba_n_heads",
    "mamba_n_groups", "mamba_d_state", "mamba_d_head", "mamba_d_conv", "mamba_expand", "mamba_chunk_size",
    "mamba_conv_bias", "mamba_proj_bias", "time_step_limit",
}
_GRANITE_IGNORED = {
    "initializer_range", "use_cache", "max_position_embeddings", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "pad_token_id", "bos_token_id", "eos_token_id", "init_method",
}
_MAMBA_TYPES, _ATTN_TYPES = ("mamba", "linear_attention"), ("attention", "full_attention")

_GRANITE_WEIGHTS = WeightMap(
    renames=(
        (r"^model\.embed_tokens\.", "backbone.embedding."),
        (r"^model\.norm\.", "backbone.norm_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"backbone.layers.\1.norm2."),
        (r"^model\.layers\.(\d+)\.mamba\.", r"backbone.layers.\1.mixer."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"backbone.layers.\1.mixer.out_proj."),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.router\.layer\.", r"backbone.layers.\1.mlp.router."),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.input_linear\.weight$", r"backbone.layers.\1.mlp.fc1"),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.output_linear\.weight$", r"backbone.layers.\1.mlp.fc2"),
        (r"^model\.layers\.(\d+)\.shared_mlp\.input_linear\.", r"backbone.layers.\1.mlp.shared.fc1."),
        (r"^model\.layers\.(\d+)\.shared_mlp\.output_linear\.", r"backbone.layers.\1.mlp.shared.fc2."),
    ),
    fusions=(
        (r"^model\.layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)$",
         r"backbone.layers.\1.mixer.in_proj.\3", ("q", "k", "v")),
    ),
    # Granite's gated MLPs compute act(first half) * second half; ours y * silu(gate) with [y; gate].
    swap_halves=(r"^model\.layers\.\d+\.(block_sparse_moe|shared_mlp)\.input_linear\.weight$",),
)


def _granite_weights(config: ModelConfig) -> WeightMap:
    """Without experts the shared MLP is the layer's whole MLP."""
    if any(isinstance(layer.mlp, MoEConfig) for layer in config.layers):
        return _GRANITE_WEIGHTS
    return replace(_GRANITE_WEIGHTS, renames=_GRANITE_WEIGHTS.renames + ((r"\.mlp\.shared\.", ".mlp."),))


def granite_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _GRANITE_READ - _GRANITE_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of transformers' GraniteMoeHybridConfig")
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    f.unsupported_unless("normalization_function", lambda v: v == "rmsnorm", "a norm other than RMSNorm")
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    types = f.get("layer_types", f.get("layers_block_type")) or ["mamba"] * n_layer
    key = "layer_types" if "layer_types" in raw else "layers_block_type"
    if not isinstance(types, list) or len(types) != n_layer:
        f.fail(key, f"must list one type per layer ({n_layer}), got {types!r}")
    bad = sorted({t for t in types if t not in _MAMBA_TYPES + _ATTN_TYPES}, key=str)
    if bad:
        f.fail(key, f"holds {bad[0]!r}, not a layer type we know (mamba, attention)")
    expand, n_heads = f.int("mamba_expand", 2), f.int("mamba_n_heads", 128)
    d_head = f.get("mamba_d_head", "auto")
    if n_heads < 1 or (expand * hidden) % n_heads:
        f.fail("mamba_n_heads", f"= {n_heads} does not divide mamba_expand * hidden_size = {expand * hidden}")
    headdim = (expand * hidden) // n_heads if d_head == "auto" else f.int("mamba_d_head")
    heads = f.int("num_attention_heads", 32)
    if heads < 1 or hidden % heads:
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden}")
    rope = f.get("position_embedding_type") == "rope"
    theta, _ = _rope(f) if rope else (10000.0, 1.0)
    bias = f.bool("attention_bias", False)
    experts = f.int("num_local_experts", 8)
    d_shared = f.int("shared_intermediate_size", 1024)
    if experts > 0:
        mlp = MoEConfig(num_experts=experts, top_k=f.int("num_experts_per_tok", 2),
                        d_expert=f.int("intermediate_size", required=True), d_shared=d_shared)
    else:
        mlp = MLPConfig(d_shared)
    multipliers = {name: f.float(field, 1.0) for name, field in (
        ("embedding_multiplier", "embedding_multiplier"), ("residual_multiplier", "residual_multiplier"))}
    try:
        attn = AttnConfig(num_heads=heads, num_heads_kv=f.int("num_key_value_heads", heads), head_dim=hidden // heads,
                          rotary_emb_dim=hidden // heads if rope else 0, rotary_emb_base=theta, qkv_proj_bias=bias,
                          out_proj_bias=bias, softmax_scale=f.float("attention_multiplier", 1.0))
        stack = mamba_stack(
            arch="mamba2", d_model=hidden, n_layer=n_layer, vocab_size=f.int("vocab_size", required=True),
            d_state=f.int("mamba_d_state", 256), d_conv=f.int("mamba_d_conv", 4), expand=expand, headdim=headdim,
            ngroups=f.int("mamba_n_groups", 1), chunk_size=f.int("mamba_chunk_size", 256),
            conv_bias=f.bool("mamba_conv_bias", True), proj_bias=f.bool("mamba_proj_bias", False), rms_norm=True,
            norm_eps=f.float("rms_norm_eps", 1e-6), residual_in_fp32=False,
            tie_embeddings=f.bool("tie_word_embeddings", False),
            attn_layer_idx=[i for i, t in enumerate(types) if t in _ATTN_TYPES], attn=attn)
        layers = tuple(LayerConfig(layer.mixer, mlp) for layer in stack.layers)
        return replace(stack, layers=layers, logits_multiplier=1.0 / f.float("logits_scaling", 1.0), **multipliers)
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- Nemotron-H

_NEMOTRON_READ = {
    "vocab_size", "hidden_size", "num_hidden_layers", "hybrid_override_pattern", "layers_block_type",
    "num_attention_heads", "num_key_value_heads", "head_dim", "attention_head_dim", "mamba_num_heads",
    "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "use_conv_bias", "use_bias",
    "layer_norm_epsilon", "time_step_limit", "mamba_hidden_act", "intermediate_size", "mlp_hidden_act", "mlp_bias",
    "expand", "tie_word_embeddings",
}
# Fields of training, initialisation, kernels, the runtime, the multi-token-prediction head (its
# weights are not part of the language model), and of MoE layers (checked where the pattern has one).
_NEMOTRON_IGNORED = {
    "initializer_range", "use_cache", "max_position_embeddings", "attention_dropout", "hidden_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id", "num_logits_to_keep", "rescale_prenorm_residual",
    "residual_in_fp32", "time_step_min", "time_step_max", "time_step_floor", "use_mamba_kernels",
    "mamba_ssm_cache_dtype", "attention_bias", "mamba_proj_bias", "sliding_window", "mtp_layers_block_type",
    "num_nextn_predict_layers", "moe_intermediate_size", "moe_latent_size", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_overlap", "n_group", "n_routed_experts", "n_shared_experts", "norm_topk_prob",
    "num_experts_per_tok", "output_router_logits", "routed_scaling_factor", "topk_group", "num_local_experts",
    "router_aux_loss_coef", "mamba_chunk_size", "mamba_d_conv", "mamba_n_groups", "mamba_dt_limit",
    "mamba_conv_bias",
}
_NEMOTRON_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_NEMOTRON_TYPES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
                   "full_attention": "attention", "mlp": "mlp", "moe": "moe"}

_NEMOTRON_WEIGHTS = WeightMap(
    renames=(
        (r"^(model|backbone)\.embeddings\.", "backbone.embedding."),
        (r"^model\.", "backbone."),
        (r"^backbone\.layers\.(\d+)\.mixer\.o_proj\.", r"backbone.layers.\1.mixer.out_proj."),
        (r"^backbone\.layers\.(\d+)\.mixer\.up_proj\.", r"backbone.layers.\1.mixer.fc1."),
        (r"^backbone\.layers\.(\d+)\.mixer\.down_proj\.", r"backbone.layers.\1.mixer.fc2."),
        (r"^backbone\.layers\.(\d+)\.mixer\.gate\.weight$", r"backbone.layers.\1.mixer.router.weight"),
        (r"^backbone\.layers\.(\d+)\.mixer\.gate\.e_score_correction_bias$", r"backbone.layers.\1.mixer.router_bias"),
        (r"^backbone\.layers\.(\d+)\.mixer\.shared_experts\.up_proj\.", r"backbone.layers.\1.mixer.shared.fc1."),
        (r"^backbone\.layers\.(\d+)\.mixer\.shared_experts\.down_proj\.", r"backbone.layers.\1.mixer.shared.fc2."),
    ),
    stacks=(
        (r"^(?:model|backbone)\.layers\.(\d+)\.mixer\.experts\.(?P<part>\d+)\.up_proj\.weight$",
         r"backbone.layers.\1.mixer.fc1"),
        (r"^(?:model|backbone)\.layers\.(\d+)\.mixer\.experts\.(?P<part>\d+)\.down_proj\.weight$",
         r"backbone.layers.\1.mixer.fc2"),
    ),
    fusions=(
        (r"^(?:model|backbone)\.layers\.(\d+)\.mixer\.(?P<part>[qkv])_proj\.(weight|bias)$",
         r"backbone.layers.\1.mixer.in_proj.\3", ("q", "k", "v")),
    ),
    drops=(r"^mtp\.",),
)


def _nemotron_moe(f: Fields) -> MoEMixerConfig:
    """The "E" layers: squared-ReLU experts and shared expert, the sigmoid router with its
    correction bias and groups (NemotronHTopkRouter)."""
    f.unsupported_unless("moe_latent_size", lambda v: v is None, "latent projections around the experts")
    experts = f.int("n_routed_experts", f.int("num_local_experts", 8))
    try:
        return MoEMixerConfig(MoEConfig(
            num_experts=experts, top_k=f.int("num_experts_per_tok", 2), d_expert=f.int("moe_intermediate_size", 7688),
            d_shared=f.int("moe_shared_expert_intermediate_size", 7688), experts="relu2", router="sigmoid",
            n_group=f.int("n_group", 1), topk_group=f.int("topk_group", 1), norm_topk=f.bool("norm_topk_prob", True),
            scaling=f.float("routed_scaling_factor", 1.0), shared_bias=f.bool("mlp_bias", False)))
    except ValueError as e:
        raise CheckpointError(f"{f.where}: {e}") from None


def nemotron_h_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _NEMOTRON_READ - _NEMOTRON_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of transformers' NemotronHConfig")
    f.unsupported_unless("mamba_hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    f.unsupported_unless("mlp_hidden_act", lambda v: v == "relu2", "an MLP activation other than squared ReLU")
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    if raw.get("layers_block_type") is not None:
        key, types = "layers_block_type", f.get("layers_block_type")
        if not isinstance(types, list) or any(t not in _NEMOTRON_TYPES for t in types):
            bad = next((t for t in types if t not in _NEMOTRON_TYPES), types) if isinstance(types, list) else types
            f.fail(key, f"holds {bad!r}, not a block type we know (mamba, attention, mlp, moe)")
        types = [_NEMOTRON_TYPES[t] for t in types]
    else:
        key, pattern = "hybrid_override_pattern", f.get("hybrid_override_pattern", required=True)
        bad = next((c for c in str(pattern) if c not in _NEMOTRON_PATTERN), None)
        if not isinstance(pattern, str) or not pattern or bad is not None:
            f.fail(key, f"holds {bad!r}, not a block type we know (M, *, -, E)")
        types = [_NEMOTRON_PATTERN[c] for c in pattern]
    moe = _nemotron_moe(f) if "moe" in types else None
    hidden = f.int("hidden_size", required=True)
    heads = f.int("num_attention_heads", 32)
    head_dim = f.int("head_dim", f.int("attention_head_dim", 128))
    d_inner = f.int("mamba_num_heads", 128) * f.int("mamba_head_dim", 64)
    eps = f.float("layer_norm_epsilon", 1e-5)
    try:
        mixers = {
            "mamba": Mamba2Config(
                d_inner=d_inner, d_state=f.int("ssm_state_size", 128), d_conv=f.int("conv_kernel", 4),
                headdim=f.int("mamba_head_dim", 64), ngroups=f.int("n_groups", 8), chunk_size=f.int("chunk_size", 128),
                conv_bias=f.bool("use_conv_bias", True), proj_bias=f.bool("use_bias", False), norm_eps=eps),
            "attention": AttnConfig(num_heads=heads, num_heads_kv=f.int("num_key_value_heads", 8), head_dim=head_dim,
                                    qkv_proj_bias=False, out_proj_bias=False),  # no rotary: no positional encoding
            "mlp": MLPMixerConfig(d_intermediate=f.int("intermediate_size", 21504), bias=f.bool("mlp_bias", False)),
            "moe": moe,
        }
        # lm_head is never tied in transformers' NemotronH (whatever tie_word_embeddings says).
        return ModelConfig(d_model=hidden, vocab_size=f.int("vocab_size", required=True),
                           layers=tuple(LayerConfig(mixers[t]) for t in types), rms_norm=True, norm_eps=eps,
                           residual_in_fp32=False, tie_embeddings=False)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- Falcon-H1

_FALCON_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "mamba_d_ssm",
    "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
    "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "mamba_norm_before_gate", "mamba_rms_norm",
    "time_step_limit", "projectors_bias", "rope_parameters", "rope_theta", "rope_scaling", "lm_head_multiplier",
    "embedding_multiplier", "mlp_multipliers", "key_multiplier", "attention_out_multiplier",
    "attention_in_multiplier", "ssm_multipliers", "ssm_in_multiplier", "ssm_out_multiplier", "attention_bias",
    "mlp_bias",
}
_FALCON_IGNORED = {
    "initializer_range", "use_cache", "num_logits_to_keep", "max_position_embeddings", "attention_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id", "mamba_use_mlp", "mamba_chunk_size_feed_forward",
}


def _multipliers(f: Fields, key: str, n: int) -> list[float]:
    values = f.get(key, [1.0] * n)
    if not isinstance(values, list) or len(values) != n or any(_as_number(v) is None for v in values):
        f.fail(key, f"must be a list of {n} numbers, got {values!r}")
    return [float(v) for v in values]


def _as_number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def falcon_h1_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _FALCON_READ - _FALCON_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of transformers' FalconH1Config")
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    f.unsupported_unless("mlp_bias", lambda v: v is False, "MLP biases")
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    if f.bool("projectors_bias", False) != f.bool("mamba_proj_bias", False):
        f.fail("projectors_bias", "differs from mamba_proj_bias (a bias on one Mamba projection only): not supported")
    _multipliers(f, "ssm_multipliers", 5), _multipliers(f, "mlp_multipliers", 2)  # checked; folded into weights
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    d_ssm = f.int("mamba_d_ssm", 1024) if "mamba_d_ssm" not in raw or raw["mamba_d_ssm"] is not None \
        else f.int("mamba_expand", 2) * hidden
    n_heads = f.int("mamba_n_heads", 128)
    d_head = f.get("mamba_d_head", "auto")
    headdim = d_ssm // max(n_heads, 1) if d_head == "auto" else f.int("mamba_d_head")
    if n_heads < 1 or headdim * n_heads != d_ssm:
        f.fail("mamba_d_head", f"= {d_head} times mamba_n_heads = {n_heads} is not the SSM width {d_ssm}")
    heads = f.int("num_attention_heads", 32)
    if heads < 1 or (f.get("head_dim") is None and hidden % heads):
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden} and head_dim is missing")
    head_dim = f.int("head_dim", hidden // heads)
    theta, _ = _rope(f)
    gate_norm = ("none" if not f.bool("mamba_rms_norm", False) else
                 "before_gate" if f.bool("mamba_norm_before_gate", True) else "after_gate")
    bias = f.bool("attention_bias", False)
    eps = f.float("rms_norm_eps", 1e-5)
    try:
        mixer = ParallelConfig(
            attn=AttnConfig(num_heads=heads, num_heads_kv=f.int("num_key_value_heads", 8), head_dim=head_dim,
                            rotary_emb_dim=head_dim, rotary_emb_base=theta, qkv_proj_bias=bias, out_proj_bias=bias),
            ssm=Mamba2Config(d_inner=d_ssm, d_state=f.int("mamba_d_state", 256), d_conv=f.int("mamba_d_conv", 4),
                             headdim=headdim, ngroups=f.int("mamba_n_groups", 1),
                             chunk_size=f.int("mamba_chunk_size", 256), conv_bias=f.bool("mamba_conv_bias", True),
                             proj_bias=f.bool("mamba_proj_bias", False), norm_eps=eps, gate_norm=gate_norm))
        mlp = MLPConfig(f.int("intermediate_size", 14336))
        return ModelConfig(d_model=hidden, vocab_size=f.int("vocab_size", required=True),
                           layers=tuple(LayerConfig(mixer, mlp) for _ in range(n_layer)), rms_norm=True,
                           norm_eps=eps, residual_in_fp32=False, tie_embeddings=f.bool("tie_word_embeddings", False),
                           embedding_multiplier=f.float("embedding_multiplier", 1.0),
                           logits_multiplier=f.float("lm_head_multiplier", 1.0))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _scale(factor):
    return lambda t: t * factor


def _falcon_h1_weights(config: ModelConfig, raw: dict) -> WeightMap:
    """Falcon-H1's multipliers around linear maps, folded into the weights: the μP vector on the
    SSM's in_proj rows ([z | x | B | C | Δ] by ``ssm_multipliers``) and ``ssm_in_multiplier`` on
    its input, ``ssm_out_multiplier`` on out_proj, ``attention_in_multiplier`` on q/k/v's input,
    ``key_multiplier`` on k, ``attention_out_multiplier`` on o, the MLP's gate and down
    multipliers. The stored tensors are scaled in fp32 and rounded once to the model's dtype."""
    ssm = config.layers[0].mixer.ssm
    get = lambda key, default: float(raw.get(key) if raw.get(key) is not None else default)  # noqa: E731
    m = [float(v) for v in (raw.get("ssm_multipliers") or [1.0] * 5)]
    gate_m, down_m = [float(v) for v in (raw.get("mlp_multipliers") or [1.0, 1.0])]
    gn = ssm.ngroups * ssm.d_state
    rows = torch.cat([torch.full((n,), v) for n, v in zip(
        (ssm.d_inner, ssm.d_inner, gn, gn, ssm.nheads), m)])
    s_in, a_in, key_m = get("ssm_in_multiplier", 1.0), get("attention_in_multiplier", 1.0), get("key_multiplier", 1.0)

    def fold(fn):
        return lambda t: fn(t.float()).to(t.dtype)

    layer = r"^model\.layers\.\d+\."
    return WeightMap(
        renames=(
            (r"^model\.embed_tokens\.", "backbone.embedding."),
            (r"^model\.final_layernorm\.", "backbone.norm_f."),
            (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm."),
            (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.", r"backbone.layers.\1.norm2."),
            (r"^model\.layers\.(\d+)\.mamba\.", r"backbone.layers.\1.mixer.ssm."),
            (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"backbone.layers.\1.mixer.attn.out_proj."),
            (r"^model\.layers\.(\d+)\.feed_forward\.down_proj\.", r"backbone.layers.\1.mlp.fc2."),
        ),
        fusions=(
            (r"^model\.layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)$",
             r"backbone.layers.\1.mixer.attn.in_proj.\3", ("q", "k", "v")),
            (r"^model\.layers\.(\d+)\.feed_forward\.(?P<part>up|gate)_proj\.weight$",
             r"backbone.layers.\1.mlp.fc1.weight", ("up", "gate")),
        ),
        transforms=(
            (layer + r"mamba\.in_proj\.weight$", fold(lambda t: t * rows[:, None] * s_in)),
            (layer + r"mamba\.in_proj\.bias$", fold(lambda t: t * rows)),
            (layer + r"mamba\.out_proj\.", fold(_scale(get("ssm_out_multiplier", 1.0)))),
            (layer + r"self_attn\.[qv]_proj\.weight$", fold(_scale(a_in))),
            (layer + r"self_attn\.k_proj\.weight$", fold(_scale(a_in * key_m))),
            (layer + r"self_attn\.k_proj\.bias$", fold(_scale(key_m))),
            (layer + r"self_attn\.o_proj\.", fold(_scale(get("attention_out_multiplier", 1.0)))),
            (layer + r"feed_forward\.gate_proj\.", fold(_scale(gate_m))),
            (layer + r"feed_forward\.down_proj\.", fold(_scale(down_m))),
        ),
    )


# ----------------------------------------------------------------------------- Jamba

_JAMBA_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "num_experts_per_tok", "num_experts",
    "expert_layer_period", "expert_layer_offset", "attn_layer_period", "attn_layer_offset", "mamba_d_state",
    "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias",
}
_JAMBA_IGNORED = {
    "initializer_range", "use_cache", "num_logits_to_keep", "max_position_embeddings", "attention_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id", "output_router_logits", "router_aux_loss_coef",
    "use_mamba_kernels", "use_mambapy", "use_associative_scan", "sliding_window", "calc_logits_for_entire_prompt",
}

_JAMBA_WEIGHTS = WeightMap(
    renames=(
        (r"^model\.embed_tokens\.", "backbone.embedding."),
        (r"^model\.final_layernorm\.", "backbone.norm_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm."),
        (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.", r"backbone.layers.\1.norm2."),
        (r"^model\.layers\.(\d+)\.mamba\.", r"backbone.layers.\1.mixer."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"backbone.layers.\1.mixer.out_proj."),
        (r"^model\.layers\.(\d+)\.feed_forward\.router\.", r"backbone.layers.\1.mlp.router."),
        (r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.down_proj\.weight$",
         r"backbone.layers.\1.mlp.experts.\2.fc2"),
        (r"^model\.layers\.(\d+)\.feed_forward\.down_proj\.", r"backbone.layers.\1.mlp.fc2."),
    ),
    fusions=(
        (r"^model\.layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)$",
         r"backbone.layers.\1.mixer.in_proj.\3", ("q", "k", "v")),
        (r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(?P<part>up|gate)_proj\.weight$",
         r"backbone.layers.\1.mlp.experts.\2.fc1", ("up", "gate")),
        (r"^model\.layers\.(\d+)\.feed_forward\.(?P<part>up|gate)_proj\.weight$",
         r"backbone.layers.\1.mlp.fc1.weight", ("up", "gate")),
    ),
    stacks=(
        (r"^backbone\.layers\.(\d+)\.mlp\.experts\.(?P<part>\d+)\.fc1$", r"backbone.layers.\1.mlp.fc1"),
        (r"^backbone\.layers\.(\d+)\.mlp\.experts\.(?P<part>\d+)\.fc2$", r"backbone.layers.\1.mlp.fc2"),
    ),
)


def jamba_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _JAMBA_READ - _JAMBA_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of transformers' JambaConfig")
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    periods = {}
    for kind, (period, offset) in (("attn", (8, 4)), ("expert", (2, 1))):
        p, o = f.int(f"{kind}_layer_period", period), f.int(f"{kind}_layer_offset", offset)
        if p < 1 or not 0 <= o < p:
            f.fail(f"{kind}_layer_offset", f"= {o} must lie in [0, {kind}_layer_period = {p})")
        periods[kind] = (p, o)
    heads = f.int("num_attention_heads", 32)
    if heads < 1 or hidden % heads:
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden}")
    dt_rank = f.get("mamba_dt_rank", "auto")
    eps = f.float("rms_norm_eps", 1e-6)
    d_ff = f.int("intermediate_size", 14336)
    try:
        mamba = Mamba1Config(
            d_inner=f.int("mamba_expand", 2) * hidden, dt_rank=-(-hidden // 16) if dt_rank == "auto" else
            f.int("mamba_dt_rank"), d_state=f.int("mamba_d_state", 16), d_conv=f.int("mamba_d_conv", 4),
            conv_bias=f.bool("mamba_conv_bias", True), proj_bias=f.bool("mamba_proj_bias", False), bcdt_rmsnorm=True,
            bcdt_rmsnorm_eps=eps, bcdt_norm_weights=True)
        attn = AttnConfig(num_heads=heads, num_heads_kv=f.int("num_key_value_heads", heads), head_dim=hidden // heads,
                          qkv_proj_bias=False, out_proj_bias=False)  # no positional encoding
        experts = f.int("num_experts", 16)
        moe = MoEConfig(num_experts=experts, top_k=f.int("num_experts_per_tok", 2), d_expert=d_ff,
                        router="softmax_all") if experts > 1 else MLPConfig(d_ff)
        (ap, ao), (ep, eo) = periods["attn"], periods["expert"]
        layers = tuple(LayerConfig(attn if i % ap == ao else mamba, moe if i % ep == eo else MLPConfig(d_ff))
                       for i in range(n_layer))
        return ModelConfig(d_model=hidden, vocab_size=f.int("vocab_size", required=True), layers=layers,
                           rms_norm=True, norm_eps=eps, residual_in_fp32=False,
                           tie_embeddings=f.bool("tie_word_embeddings", False))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- the families

#: model_type -> (config reader, the weight map of a config and its raw config.json)
FAMILIES = {
    "bamba": (bamba_config, lambda config, raw: _BAMBA_WEIGHTS),
    "granitemoehybrid": (granite_config, lambda config, raw: _granite_weights(config)),
    "nemotron_h": (nemotron_h_config, lambda config, raw: _NEMOTRON_WEIGHTS),
    "falcon_h1": (falcon_h1_config, _falcon_h1_weights),
    "jamba": (jamba_config, lambda config, raw: _JAMBA_WEIGHTS),
}
