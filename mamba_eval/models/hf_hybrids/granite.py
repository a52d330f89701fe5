"""**Granite 4.0-H** (``model_type`` "granitemoehybrid", ``GraniteMoeHybridForCausalLM``): Mamba-2 and
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
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mamba_eval.models.config import AttnConfig, LayerConfig, MLPConfig, ModelConfig, MoEConfig, mamba_stack
from mamba_eval.models.config_fields import CheckpointError, Fields, is_default_dt_limit
from mamba_eval.models.hf_hybrids.common import (
    EMBED, INPUT_NORM, attention, check_known, ff_norm, final_norm, mamba2_fields, mamba_to, rope, WeightMap,
)


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
        EMBED, final_norm("norm"), INPUT_NORM, ff_norm("post_attention_layernorm"), mamba_to(), attention()[0],
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.router\.layer\.", r"backbone.layers.\1.mlp.router."),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.input_linear\.weight$", r"backbone.layers.\1.mlp.fc1"),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.output_linear\.weight$", r"backbone.layers.\1.mlp.fc2"),
        (r"^model\.layers\.(\d+)\.shared_mlp\.input_linear\.", r"backbone.layers.\1.mlp.shared.fc1."),
        (r"^model\.layers\.(\d+)\.shared_mlp\.output_linear\.", r"backbone.layers.\1.mlp.shared.fc2."),
    ),
    fusions=(attention()[1],),
    # Granite's gated MLPs compute act(first half) * second half; ours y * silu(gate) with [y; gate].
    swap_halves=(r"^model\.layers\.\d+\.(block_sparse_moe|shared_mlp)\.input_linear\.weight$",),
)


def granite_weights(config: ModelConfig) -> WeightMap:
    """Without experts the shared MLP is the layer's whole MLP."""
    if any(isinstance(layer.mlp, MoEConfig) for layer in config.layers):
        return _GRANITE_WEIGHTS
    return replace(_GRANITE_WEIGHTS, renames=_GRANITE_WEIGHTS.renames + ((r"\.mlp\.shared\.", ".mlp."),))


def granite_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    check_known(f, _GRANITE_READ, _GRANITE_IGNORED, "GraniteMoeHybridConfig")
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
    expand = f.int("mamba_expand", 2)
    ssm = mamba2_fields(f, expand * hidden)
    heads = f.int("num_attention_heads", 32)
    if heads < 1 or hidden % heads:
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden}")
    use_rope = f.get("position_embedding_type") == "rope"
    theta, _ = rope(f) if use_rope else (10000.0, 1.0)
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
                          rotary_emb_dim=hidden // heads if use_rope else 0, rotary_emb_base=theta, qkv_proj_bias=bias,
                          out_proj_bias=bias, softmax_scale=f.float("attention_multiplier", 1.0))
        stack = mamba_stack(
            arch="mamba2", d_model=hidden, n_layer=n_layer, vocab_size=f.int("vocab_size", required=True),
            expand=expand, rms_norm=True, norm_eps=f.float("rms_norm_eps", 1e-6), residual_in_fp32=False, **ssm,
            tie_embeddings=f.bool("tie_word_embeddings", False),
            attn_layer_idx=[i for i, t in enumerate(types) if t in _ATTN_TYPES], attn=attn)
        layers = tuple(LayerConfig(layer.mixer, mlp) for layer in stack.layers)
        return replace(stack, layers=layers, logits_multiplier=1.0 / f.float("logits_scaling", 1.0), **multipliers)
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: {e}") from None
