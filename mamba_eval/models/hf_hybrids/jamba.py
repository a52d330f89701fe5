"""**Jamba** (``model_type`` "jamba", ``JambaForCausalLM``): Mamba-1 layers with weighted RMSNorms of Δ,
B and C (``mamba.{dt,b,c}_layernorm``), attention where ``i % attn_layer_period ==
attn_layer_offset`` (no positional encoding), a gated MLP after every mixer or, where ``i %
expert_layer_period == expert_layer_offset``, experts routed by the softmax over all of them
(the chosen probabilities not renormalised); per-expert ``feed_forward.experts.J.{gate,up,down}_proj``
are fused and stacked.
"""

from __future__ import annotations

from pathlib import Path

from mamba_eval.models.config import AttnConfig, LayerConfig, Mamba1Config, MLPConfig, ModelConfig, MoEConfig
from mamba_eval.models.config_fields import CheckpointError, Fields
from mamba_eval.models.hf_hybrids.common import (
    EMBED, INPUT_NORM, attention, check_known, ff_norm, final_norm, gated_mlp, mamba_to, WeightMap,
)


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

JAMBA_WEIGHTS = WeightMap(
    renames=(
        EMBED, final_norm("final_layernorm"), INPUT_NORM, ff_norm("pre_ff_layernorm"), mamba_to(), attention()[0],
        (r"^model\.layers\.(\d+)\.feed_forward\.router\.", r"backbone.layers.\1.mlp.router."),
        (r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.down_proj\.weight$",
         r"backbone.layers.\1.mlp.experts.\2.fc2"),
        gated_mlp()[0],
    ),
    fusions=(
        attention()[1],
        (r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(?P<part>up|gate)_proj\.weight$",
         r"backbone.layers.\1.mlp.experts.\2.fc1", ("up", "gate")),
        gated_mlp()[1],
    ),
    stacks=(
        (r"^backbone\.layers\.(\d+)\.mlp\.experts\.(?P<part>\d+)\.fc1$", r"backbone.layers.\1.mlp.fc1"),
        (r"^backbone\.layers\.(\d+)\.mlp\.experts\.(?P<part>\d+)\.fc2$", r"backbone.layers.\1.mlp.fc2"),
    ),
)


def jamba_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    check_known(f, _JAMBA_READ, _JAMBA_IGNORED, "JambaConfig")
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
