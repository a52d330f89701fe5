"""**Bamba** (``model_type`` "bamba", ``BambaForCausalLM``; ibm-ai-platform/Bamba-9B): Mamba-2 layers,
grouped-query attention at ``attn_layer_indices`` (rotary embedding on the first
``partial_rotary_factor`` of each head, 0.5 unless ``rope_parameters`` says otherwise, GPT-NeoX
halves), a gated MLP after every mixer (``down(silu(gate(x)) * up(x))``), RMSNorm everywhere,
the residual stream in the model dtype. Mamba-2 fields ``mamba_n_heads, mamba_d_head,
mamba_n_groups, mamba_d_state, mamba_d_conv, mamba_expand, mamba_chunk_size, mamba_conv_bias,
mamba_proj_bias``; the gated norm groups by ``mamba_n_groups`` with eps ``rms_norm_eps``.
Weights ``model.embed_tokens``, ``model.layers.N.{input_layernorm, pre_ff_layernorm, mamba.*,
self_attn.{q,k,v,o}_proj, feed_forward.{gate,up,down}_proj}``, ``model.final_layernorm``,
``lm_head``: q/k/v become the attention's ``in_proj`` rows and [up; gate] the MLP's ``fc1``.
"""

from __future__ import annotations

from pathlib import Path

from mamba_eval.models.config import AttnConfig, ModelConfig, mamba_stack
from mamba_eval.models.config_fields import CheckpointError, Fields, is_default_dt_limit
from mamba_eval.models.hf_hybrids.common import (
    EMBED, INPUT_NORM, attention, check_known, ff_norm, final_norm, gated_mlp, mamba2_fields, mamba_to, rope,
    WeightMap,
)


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

BAMBA_WEIGHTS = WeightMap(
    renames=(EMBED, final_norm("final_layernorm"), INPUT_NORM, ff_norm("pre_ff_layernorm"), mamba_to(),
             attention()[0], gated_mlp()[0]),
    fusions=(attention()[1], gated_mlp()[1]),
)


def bamba_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    check_known(f, _BAMBA_READ, _BAMBA_IGNORED, "BambaConfig")
    f.unsupported_unless("mlp_bias", lambda v: v is False, "MLP biases")
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    expand = f.int("mamba_expand", 2)
    ssm = mamba2_fields(f, expand * hidden)
    heads = f.int("num_attention_heads", 32)
    if heads < 1:
        f.fail("num_attention_heads", f"must be positive, got {heads}")
    if f.get("head_dim") is None and hidden % heads:
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden} and head_dim is missing")
    head_dim = f.int("head_dim", hidden // heads)
    theta, factor = rope(f)
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
            expand=expand, rms_norm=True, norm_eps=f.float("rms_norm_eps", 1e-5), residual_in_fp32=False, **ssm,
            tie_embeddings=f.bool("tie_word_embeddings", False),
            d_intermediate=f.int("intermediate_size", 14336), attn_layer_idx=sorted(set(idx)), attn=attn)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
