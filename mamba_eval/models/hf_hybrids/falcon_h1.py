"""**Falcon-H1** (``model_type`` "falcon_h1", ``FalconH1ForCausalLM``): every block runs attention (full
rotary) and a Mamba-2 SSM of ``mamba_d_ssm`` channels side by side on its normed input and sums
them (a mixer of kind "parallel"), then a gated MLP; the SSM's gated norm is absent unless
``mamba_rms_norm`` (then before or after the gate by ``mamba_norm_before_gate``); the µP
multipliers around linear maps are folded into the weights when they are read
(:func:`falcon_h1_weights`), the embedding and LM-head multipliers kept as the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mamba_eval.models.config import AttnConfig, LayerConfig, Mamba2Config, MLPConfig, ModelConfig, ParallelConfig
from mamba_eval.models.config_fields import CheckpointError, Fields, is_default_dt_limit
from mamba_eval.models.hf_hybrids.common import (
    EMBED, INPUT_NORM, attention, check_known, ff_norm, final_norm, gated_mlp, mamba2_fields, mamba_to, rope,
    WeightMap,
)


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
    check_known(f, _FALCON_READ, _FALCON_IGNORED, "FalconH1Config")
    f.unsupported_unless("mlp_bias", lambda v: v is False, "MLP biases")
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    if f.bool("projectors_bias", False) != f.bool("mamba_proj_bias", False):
        f.fail("projectors_bias", "differs from mamba_proj_bias (a bias on one Mamba projection only): not supported")
    _multipliers(f, "ssm_multipliers", 5), _multipliers(f, "mlp_multipliers", 2)  # checked; folded into weights
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    d_ssm = f.int("mamba_d_ssm", 1024) if "mamba_d_ssm" not in raw or raw["mamba_d_ssm"] is not None \
        else f.int("mamba_expand", 2) * hidden
    ssm = mamba2_fields(f, d_ssm)
    heads = f.int("num_attention_heads", 32)
    if heads < 1 or (f.get("head_dim") is None and hidden % heads):
        f.fail("num_attention_heads", f"= {heads} does not divide hidden_size = {hidden} and head_dim is missing")
    head_dim = f.int("head_dim", hidden // heads)
    theta, _ = rope(f)
    gate_norm = ("none" if not f.bool("mamba_rms_norm", False) else
                 "before_gate" if f.bool("mamba_norm_before_gate", True) else "after_gate")
    bias = f.bool("attention_bias", False)
    eps = f.float("rms_norm_eps", 1e-5)
    try:
        mixer = ParallelConfig(
            attn=AttnConfig(num_heads=heads, num_heads_kv=f.int("num_key_value_heads", 8), head_dim=head_dim,
                            rotary_emb_dim=head_dim, rotary_emb_base=theta, qkv_proj_bias=bias, out_proj_bias=bias),
            ssm=Mamba2Config(d_inner=d_ssm, norm_eps=eps, gate_norm=gate_norm, **ssm))
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


def falcon_h1_weights(config: ModelConfig, raw: dict) -> WeightMap:
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
        renames=(EMBED, final_norm("final_layernorm"), INPUT_NORM, ff_norm("pre_ff_layernorm"),
                 mamba_to("mixer.ssm"), attention("mixer.attn")[0], gated_mlp()[0]),
        fusions=(attention("mixer.attn")[1], gated_mlp()[1]),
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
