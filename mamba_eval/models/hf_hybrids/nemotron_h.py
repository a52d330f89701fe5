"""**Nemotron-H** (``model_type`` "nemotron_h", ``NemotronHForCausalLM``): one sublayer per block after
the block's norm, by ``hybrid_override_pattern`` (``M`` Mamba-2, ``*`` attention, ``-`` MLP, ``E``
mixture of experts) or ``layers_block_type``; the Mamba-2 width is ``mamba_num_heads *
mamba_head_dim``; attention has no positional encoding and no biases; the MLP is
``down(relu(up(x))^2)`` (a mixer of kind "mlp"); the MoE layers (kind "moe") have squared-ReLU
experts, a shared expert and the sigmoid router with a correction bias and expert groups; the LM
head is never tied. Weights are ours but
``backbone.embeddings``, ``mixer.{q,k,v,o}_proj``, ``mixer.{up,down}_proj``, ``mixer.gate.{weight,
e_score_correction_bias}``, ``mixer.experts.J.{up,down}_proj`` (stacked) and
``mixer.shared_experts.*``, ``mixer.fc{1,2}_latent_proj`` (the latent experts' projections);
``mtp.*`` (the multi-token-prediction head) is not read.
"""

from __future__ import annotations

from pathlib import Path

from mamba_eval.models.config import (
    AttnConfig, LayerConfig, Mamba2Config, MLPMixerConfig, ModelConfig, MoEConfig, MoEMixerConfig,
)
from mamba_eval.models.config_fields import CheckpointError, Fields, is_default_dt_limit
from mamba_eval.models.hf_hybrids.common import check_known, WeightMap


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

NEMOTRON_WEIGHTS = WeightMap(
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
        (r"^backbone\.layers\.(\d+)\.mixer\.fc1_latent_proj\.", r"backbone.layers.\1.mixer.latent_in."),
        (r"^backbone\.layers\.(\d+)\.mixer\.fc2_latent_proj\.", r"backbone.layers.\1.mixer.latent_out."),
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
    correction bias and groups (NemotronHTopkRouter), the experts optionally in a latent space
    (``moe_latent_size``)."""
    experts = f.int("n_routed_experts", f.int("num_local_experts", 8))
    try:
        return MoEMixerConfig(MoEConfig(
            num_experts=experts, top_k=f.int("num_experts_per_tok", 2), d_expert=f.int("moe_intermediate_size", 7688),
            d_shared=f.int("moe_shared_expert_intermediate_size", 7688), experts="relu2", router="sigmoid",
            n_group=f.int("n_group", 1), topk_group=f.int("topk_group", 1), norm_topk=f.bool("norm_topk_prob", True),
            scaling=f.float("routed_scaling_factor", 1.0), shared_bias=f.bool("mlp_bias", False),
            d_latent=0 if f.get("moe_latent_size") is None else f.int("moe_latent_size")))
    except ValueError as e:
        raise CheckpointError(f"{f.where}: {e}") from None


def nemotron_h_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    check_known(f, _NEMOTRON_READ, _NEMOTRON_IGNORED, "NemotronHConfig")
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
