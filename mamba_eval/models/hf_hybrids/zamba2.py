"""**Zamba2** (``model_type`` "zamba2", ``Zamba2ForCausalLM``; Zyphra/Zamba2-1.2B, 2.7B, 7B): a stack of
Mamba-2 layers (``layers_block_type`` "mamba" / "linear_attention") and "hybrid" layers, which
first run one of ``num_mem_blocks`` shared transformer blocks (the n-th hybrid layer the block
``n % num_mem_blocks``) on [stream; original embeddings] and add its output, through the layer's
own linear map, to their Mamba layer's input only (``mamba_eval.models.shared``). Each use has
low-rank adapters of rank ``adapter_rank`` on the block's MLP, and on q, k and v when
``use_shared_attention_adapter``. The attention reads 2 ``hidden_size`` channels in
``num_attention_heads`` heads of 2 ``hidden_size`` / heads channels, scaled by
(head_dim / 2)^-1/2, with a full rotary embedding when ``use_mem_rope``; the MLP is
``down(gelu(gate) * up)`` of width ``intermediate_size`` (4 ``hidden_size`` by default).

Mamba-2 fields ``n_mamba_heads, mamba_d_state, mamba_d_conv, mamba_expand, mamba_ngroups,
chunk_size``; the head size is the SSM width over ``n_mamba_heads``; the conv always has a bias,
the gated norm eps is 1e-5, and Δ is clamped below at ``time_step_min`` (as transformers'
``Zamba2MambaMixer`` does). Projection biases by ``add_bias_linear``; embeddings tied by default.

Weights: a shared block is stored under the ``shared_transformer`` of one (or, as aliases, several)
of the layers that use it, with every use's adapters in its ``*_adapter_list.n`` (n counting
hybrid layers); they are read from whichever using layer holds them, and copies that disagree
are refused.
"""

from __future__ import annotations

from pathlib import Path

from mamba_eval.models.config import (
    AttnConfig, LayerConfig, Mamba2Config, ModelConfig, SharedBlockConfig, SharedUseConfig,
)
from mamba_eval.models.config_fields import CheckpointError, Fields, generic_config_keys
from mamba_eval.models.hf_hybrids.common import EMBED, INPUT_NORM, WeightMap, final_norm, mamba_to

_ZAMBA2_READ = {
    "vocab_size", "hidden_size", "num_hidden_layers", "layers_block_type", "mamba_d_state", "mamba_d_conv",
    "mamba_expand", "mamba_ngroups", "n_mamba_heads", "chunk_size", "time_step_min", "add_bias_linear",
    "intermediate_size", "hidden_act", "num_attention_heads", "num_key_value_heads", "num_mem_blocks",
    "use_shared_attention_adapter", "adapter_rank", "use_mem_rope", "rope_parameters", "rope_theta",
    "rms_norm_eps", "tie_word_embeddings", "use_long_context",
}
# Fields of training, initialisation, generation defaults or the runtime, and the ones that
# Zamba2Config derives from the others (recomputed here as it recomputes them).
_ZAMBA2_IGNORED = {
    "initializer_range", "use_cache", "num_logits_to_keep", "max_position_embeddings", "attention_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id", "use_mamba_kernels", "use_mem_eff_path", "time_step_max",
    "time_step_floor", "time_step_limit", "use_conv_bias", "attention_hidden_size", "attention_head_dim",
    "mamba_headdim", "kv_channels", "num_query_groups", "hybrid_layer_ids", "ffn_hidden_size",
}
_MAMBA_TYPES = ("mamba", "linear_attention")


def _layer_types(f: Fields, n_layer: int) -> list[str]:
    types = f.get("layers_block_type")
    if types is None:  # Zamba2Config's default layout, for its default 54 layers
        types = ["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3 + \
            ["hybrid"] + ["mamba"] * 2
    if not isinstance(types, list) or len(types) != n_layer:
        f.fail("layers_block_type", f"must list the type of each of the {n_layer} layers, got {types!r}")
    unknown = next((t for t in types if t not in (*_MAMBA_TYPES, "hybrid")), None)
    if unknown is not None:
        f.fail("layers_block_type", f"has the unknown layer type {unknown!r} (known: mamba, linear_attention, hybrid)")
    return types


def zamba2_config(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _ZAMBA2_READ - _ZAMBA2_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of transformers' Zamba2Config")
    f.unsupported_unless("hidden_act", lambda v: v == "gelu", "activation other than GELU")
    f.unsupported_unless("use_long_context", lambda v: v is False, "rescaled rotary embedding")
    hidden, n_layer = f.int("hidden_size", required=True), f.int("num_hidden_layers", required=True)
    types = _layer_types(f, n_layer)
    d_inner, n_heads = f.int("mamba_expand", 2) * hidden, f.int("n_mamba_heads", 8)
    if n_heads < 1 or d_inner % n_heads:
        f.fail("n_mamba_heads", f"= {n_heads} does not divide the SSM width {d_inner}")
    heads = f.int("num_attention_heads", 32)
    if heads < 1 or (2 * hidden) % heads:
        f.fail("num_attention_heads", f"= {heads} does not divide the attention width 2 x hidden_size = {2 * hidden}")
    head_dim = 2 * hidden // heads
    kv_heads = f.int("num_key_value_heads", heads) if raw.get("num_key_value_heads") is not None else heads
    adapters = f.bool("use_shared_attention_adapter", False)
    if adapters and kv_heads != heads:
        f.fail("num_key_value_heads", f"= {kv_heads} with use_shared_attention_adapter: the adapters of k and v "
                                      f"have 2 x hidden_size outputs, which needs num_key_value_heads = {heads}")
    theta = 10000.0
    params = f.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            f.fail("rope_parameters", f"must be an object, got {params!r}")
        p = Fields(params, where, prefix="rope_parameters.")
        p.unsupported_unless("rope_type", lambda v: v == "default", "scaled rotary embedding")
        theta = p.float("rope_theta", theta)
    else:
        theta = f.float("rope_theta", theta)
    bias, n_blocks = f.bool("add_bias_linear", False), f.int("num_mem_blocks", 1)
    rank = f.int("adapter_rank", 128)
    try:
        ssm = Mamba2Config(
            d_inner=d_inner, d_state=f.int("mamba_d_state", 64), d_conv=f.int("mamba_d_conv", 4),
            headdim=d_inner // n_heads, ngroups=f.int("mamba_ngroups", 1), chunk_size=f.int("chunk_size", 256),
            conv_bias=True, proj_bias=bias, norm_eps=1e-5, gate_norm="after_gate",
            dt_min=f.float("time_step_min", 0.001))
        attn = AttnConfig(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim,
                          rotary_emb_dim=head_dim if f.bool("use_mem_rope", False) else 0, rotary_emb_base=theta,
                          qkv_proj_bias=False, out_proj_bias=False, softmax_scale=(head_dim / 2) ** -0.5)
        layers, uses = [], 0
        for t in types:
            shared = None
            if t == "hybrid":
                shared = SharedUseConfig(block=uses % n_blocks, rank=rank, attn_adapters=adapters)
                uses += 1
            layers.append(LayerConfig(ssm, None, shared))
        block = SharedBlockConfig(attn=attn, d_intermediate=f.int("intermediate_size", 4 * hidden), mlp_bias=bias)
        return ModelConfig(d_model=hidden, vocab_size=f.int("vocab_size", required=True), layers=tuple(layers),
                           rms_norm=True, norm_eps=f.float("rms_norm_eps", 1e-5), residual_in_fp32=False,
                           tie_embeddings=f.bool("tie_word_embeddings", True),
                           shared_blocks=(block,) * min(n_blocks, uses))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def zamba2_weights(config: ModelConfig) -> WeightMap:
    """The names of the layers (plain Mamba layers, and the hybrid layers' ``mamba_decoder`` and
    ``linear``) and of the shared blocks and adapters, which depend on which layers use which block."""
    layer = r"^model\.layers\.(\d+)\."
    renames = [EMBED, final_norm("final_layernorm"), INPUT_NORM, mamba_to(),
               (layer + r"mamba_decoder\.input_layernorm\.", r"backbone.layers.\1.norm."),
               (layer + r"mamba_decoder\.mamba\.", r"backbone.layers.\1.mixer."),
               (layer + r"linear\.", r"backbone.layers.\1.shared_use.linear.")]
    fusions = []
    use_layers = [i for i, spec in enumerate(config.layers) if spec.shared is not None]
    for n, i in enumerate(use_layers):  # the n-th use's adapters, wherever its block is stored
        at = r"^model\.layers\.\d+\.shared_transformer\."
        ours = f"backbone.layers.{i}.shared_use."
        renames += [(at + rf"feed_forward\.gate_up_proj_adapter_list\.{n}\.0\.", ours + "mlp_down."),
                    (at + rf"feed_forward\.gate_up_proj_adapter_list\.{n}\.1\.", ours + "mlp_up."),
                    (at + rf"self_attn\.linear_(?P<p>[qkv])_adapter_list\.{n}\.1\.", ours + r"\g<p>_up.")]
        fusions.append((at + rf"self_attn\.linear_(?P<part>[qkv])_adapter_list\.{n}\.0\.weight$",
                        ours + "attn_down.weight", ("q", "k", "v")))
    for b in range(len(config.shared_blocks)):
        at = rf"^model\.layers\.(?:{'|'.join(map(str, config.shared_uses(b)))})\.shared_transformer\."
        ours = f"backbone.shared.{b}."
        renames += [(at + r"input_layernorm\.", ours + "norm_in."), (at + r"pre_ff_layernorm\.", ours + "norm_ff."),
                    (at + r"self_attn\.o_proj\.", ours + "attn.out_proj."),
                    (at + r"feed_forward\.gate_up_proj\.", ours + "fc1."),
                    (at + r"feed_forward\.down_proj\.", ours + "fc2.")]
        fusions.append((at + r"self_attn\.(?P<part>[qkv])_proj\.weight$", ours + "attn.in_proj.weight",
                        ("q", "k", "v")))
    return WeightMap(renames=tuple(renames), fusions=tuple(fusions))
