"""The architecture of a language model of the Mamba family, independent of any checkpoint format.

A model is an embedding, a list of layers and an LM head. Each layer is a block: a pre-norm and
a *mixer* (a Mamba-1, Mamba-2 or Mamba-3 SSM, causal attention; ``mamba_eval.models.mixers`` has one
module per kind and the registry that builds them), optionally followed by a pre-norm and a gated
MLP. :class:`ModelConfig` holds the list (:class:`LayerConfig`) and what the whole stack shares
(width, vocabulary, norm kind, residual precision, tied embeddings). A new family is a new way of
filling that list (in ``mamba_eval.models.formats``, the one place that reads checkpoint
configs); a new kind of mixer is a config class here plus a module in ``mixers/``.

The released variants, as configurations:

- Mamba-1 / Mamba-2 (``state-spaces/mamba-*``, ``mamba2-*``): every layer the same mixer, no MLP.
- Falcon-Mamba: Mamba-1 with weightless RMSNorms of Δ, B and C (``Mamba1Config.bcdt_rmsnorm``).
- Codestral-like Mamba-2 (``n_groups`` 8, untied embeddings): ``Mamba2Config.ngroups``.
- mamba_ssm hybrids (``mamba2attn-2.7b``): some layers attention (:class:`AttnConfig`), a gated MLP
  after every mixer (:class:`MLPConfig`) when ``d_intermediate > 0``.
- Mamba-3 (``state-spaces/mamba3-{siso,mimo}-*``): a Mamba-3 mixer (:class:`Mamba3Config`, SISO or
  MIMO) and a gated MLP in every layer.

:func:`mamba_stack` builds the uniform stack of mamba_ssm's ``MixerModel`` (the shape of all of
the above) from its familiar arguments. Sizes that follow from others are properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union


def _check_ints(owner: object, names, minimum: int = 1) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive" if minimum == 1 else "a non-negative"
            raise ValueError(f"{name} must be {what} integer, got {value!r}")


def _check_positive_float(owner: object, names) -> None:
    for name in names:
        value = getattr(owner, name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class Mamba1Config:
    """The Mamba-1 mixer (Gu & Dao 2023, Sec. 3): in_proj -> [x; z] of ``d_inner`` each; a causal
    conv of width ``d_conv`` over x; Δ, B, C from x (Δ through a rank-``dt_rank`` projection);
    a selective scan with a diagonal A ``[d_inner, d_state]``; gate silu(z); out_proj."""

    kind: ClassVar[str] = "mamba1"
    d_inner: int
    dt_rank: int
    d_state: int = 16
    d_conv: int = 4
    conv_bias: bool = True
    proj_bias: bool = False  # bias of in_proj / out_proj
    bcdt_rmsnorm: bool = False  # Falcon-Mamba: weightless RMSNorm of Δ (low rank), B and C
    bcdt_rmsnorm_eps: float = 1e-6
    bcdt_norm_weights: bool = False  # Jamba: those norms have weights

    def __post_init__(self):
        _check_ints(self, ["d_inner", "dt_rank", "d_state", "d_conv"])
        _check_positive_float(self, ["bcdt_rmsnorm_eps"])
        if self.bcdt_norm_weights and not self.bcdt_rmsnorm:
            raise ValueError("bcdt_norm_weights needs bcdt_rmsnorm (the norms of Δ, B and C)")

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv (x)."""
        return self.d_inner

    @property
    def d_in_proj(self) -> int:
        """Rows of in_proj: [x; z]."""
        return 2 * self.d_inner

    @property
    def ssm_state_shape(self) -> tuple[int, ...]:
        """One sequence's SSM state h: ``[d_inner, d_state]``."""
        return (self.d_inner, self.d_state)


@dataclass(frozen=True)
class Mamba2Config:
    """The Mamba-2 mixer (Dao & Gu 2024, Sec. 7): in_proj -> [z; x; B; C; Δ]; a causal conv over
    [x; B; C]; the SSD scan with one scalar A per head (``nheads = d_inner / headdim`` heads of
    ``headdim`` channels, B and C shared by the heads of each of ``ngroups`` groups), computed in
    chunks of ``chunk_size``; a gated RMSNorm per group; out_proj."""

    kind: ClassVar[str] = "mamba2"
    d_inner: int
    d_state: int = 128
    d_conv: int = 4
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5  # of the gated RMSNorm
    # "after_gate": RMSNorm(y * silu(z)) (mamba_ssm's); "before_gate": RMSNorm(y) * silu(z);
    # "none": y * silu(z), no norm (Falcon-H1's default)
    gate_norm: str = "after_gate"
    # Δ = max(softplus(dt + dt_bias), dt_min): Zamba2 clamps Δ from below at its time_step_min
    dt_min: float = 0.0

    def __post_init__(self):
        _check_ints(self, ["d_inner", "d_state", "d_conv", "headdim", "ngroups", "chunk_size"])
        _check_positive_float(self, ["norm_eps"])
        if not isinstance(self.dt_min, (int, float)) or isinstance(self.dt_min, bool) or not self.dt_min >= 0:
            raise ValueError(f"dt_min must be a non-negative number, got {self.dt_min!r}")
        if self.gate_norm not in ("after_gate", "before_gate", "none"):
            raise ValueError(f"gate_norm must be 'after_gate', 'before_gate' or 'none', got {self.gate_norm!r}")
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"d_inner = {self.d_inner} is not a multiple of headdim = {self.headdim}")
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"nheads = {self.nheads} is not a multiple of ngroups = {self.ngroups}")

    @property
    def nheads(self) -> int:
        """Heads H = d_inner / headdim."""
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: [x; B; C]."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """Rows of in_proj: [z; x; B; C; Δ]."""
        return self.d_inner + self.conv_dim + self.nheads

    @property
    def ssm_state_shape(self) -> tuple[int, ...]:
        """One sequence's SSM state h: ``[nheads, headdim, d_state]``."""
        return (self.nheads, self.headdim, self.d_state)


@dataclass(frozen=True)
class Mamba3Config:
    """The Mamba-3 mixer (Lahoti et al. 2026, arXiv 2603.15569): in_proj -> [z; x; B; C; Δ; A; λ;
    angles] (no conv); B and C RMS-normed, biased per head and rotated by data-dependent angles
    (``rope_fraction`` of the state's coordinates); a data-dependent A per head and position,
    ``-f(dd_A)`` floored at ``-A_floor``; the exponential-trapezoidal recurrence
    (``kernels/mamba3.py`` has the equations); ``is_mimo``: ``mimo_rank`` inputs and outputs per
    head through ``mimo_x``/``mimo_z``/``mimo_o``; gate silu(z), after a per-head RMSNorm when
    ``is_outproj_norm``; out_proj.

    ``A_activation`` is f: ``"softplus"`` (the code released with the paper, fla) or
    ``"heavy_tail"`` (mamba_ssm since commit c69aaab: 1 + x for x >= 0, 1 / (1 - x) below); no
    checkpoint field records which one a model was trained with."""

    kind: ClassVar[str] = "mamba3"
    d_inner: int
    d_state: int = 128
    headdim: int = 64
    ngroups: int = 1
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    A_activation: str = "softplus"
    is_outproj_norm: bool = False
    is_mimo: bool = False
    mimo_rank: int = 4  # used only when is_mimo
    chunk_size: int = 64
    proj_bias: bool = False  # bias of in_proj / out_proj (fla's use_bias)
    norm_eps: float = 1e-5  # of the B, C and output norms

    def __post_init__(self):
        _check_ints(self, ["d_inner", "d_state", "headdim", "ngroups", "mimo_rank", "chunk_size"])
        _check_positive_float(self, ["A_floor", "norm_eps"])
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"d_inner = {self.d_inner} is not a multiple of headdim = {self.headdim}")
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"nheads = {self.nheads} is not a multiple of ngroups = {self.ngroups}")
        if self.rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0 (as in mamba_ssm), got {self.rope_fraction!r}")
        if self.n_angles < 1:
            raise ValueError(f"d_state = {self.d_state} leaves no rotary angle at rope_fraction {self.rope_fraction}")
        if self.A_activation not in ("softplus", "heavy_tail"):
            raise ValueError(f"A_activation must be 'softplus' or 'heavy_tail', got {self.A_activation!r}")
        if self.is_mimo and self.d_state % 4:
            # The MIMO kernels rotate pairs (j, j + N/2) over the first quarter (half) of the state.
            raise ValueError(f"MIMO needs d_state a multiple of 4, got {self.d_state}")

    @property
    def nheads(self) -> int:
        """Heads H = d_inner / headdim."""
        return self.d_inner // self.headdim

    @property
    def rank(self) -> int:
        """R: the MIMO rank, 1 for SISO."""
        return self.mimo_rank if self.is_mimo else 1

    @property
    def n_angles(self) -> int:
        """S: rotary angles per head, half the rotated coordinates (rope_fraction of d_state, made even)."""
        rotated = int(self.d_state * self.rope_fraction)
        return (rotated - rotated % 2) // 2

    @property
    def d_in_proj(self) -> int:
        """Rows of in_proj: [z; x; B (R G N); C (R G N); Δ (H); A (H); λ (H); angles (S)]."""
        return 2 * self.d_inner + 2 * self.rank * self.ngroups * self.d_state + 3 * self.nheads + self.n_angles

    @property
    def ssm_state_shape(self) -> tuple[int, ...]:
        """One sequence's SSM state: ``[nheads, headdim, d_state]``."""
        return (self.nheads, self.headdim, self.d_state)


@dataclass(frozen=True)
class AttnConfig:
    """Causal multi-head attention as mamba_ssm's ``MHA`` builds it.

    ``in_proj`` maps D to [q (num_heads x head_dim); k; v (num_heads_kv x head_dim each)] and,
    when ``mlp_dim > 0``, a parallel gated MLP's [up; gate] (``mlp_dim`` rows, split in halves);
    an optional depthwise causal conv of width ``d_conv`` (with bias, no activation) runs over
    the q/k/v channels; rotary embeddings rotate the first ``rotary_emb_dim`` channels of each q
    and k head (GPT-NeoX halves, or even/odd pairs when ``rotary_emb_interleaved``); ``out_proj``
    maps [attention output; MLP output] back to D. K/V heads are shared by groups of
    ``num_heads / num_heads_kv`` query heads (grouped-query attention).
    """

    kind: ClassVar[str] = "attention"
    num_heads: int
    num_heads_kv: int
    head_dim: int
    rotary_emb_dim: int = 0  # 0: no rotary embedding
    rotary_emb_base: float = 10000.0
    rotary_emb_interleaved: bool = False
    qkv_proj_bias: bool = True
    out_proj_bias: bool = True
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)
    d_conv: int = 0  # 0: no conv over q/k/v
    mlp_dim: int = 0  # rows of in_proj for the parallel gated MLP, as built (a multiple of 256 in mamba_ssm)

    def __post_init__(self):
        _check_ints(self, ["num_heads", "num_heads_kv", "head_dim"])
        _check_ints(self, ["rotary_emb_dim", "d_conv", "mlp_dim"], minimum=0)
        if self.num_heads % self.num_heads_kv != 0:
            raise ValueError(f"num_heads = {self.num_heads} is not a multiple of num_heads_kv = {self.num_heads_kv}")
        if self.rotary_emb_dim % 2 or self.rotary_emb_dim > self.head_dim:
            raise ValueError(
                f"rotary_emb_dim must be even and at most head_dim = {self.head_dim}, got {self.rotary_emb_dim}"
            )
        if self.mlp_dim % 2:
            raise ValueError(f"mlp_dim must be even (it is split into up and gate halves), got {self.mlp_dim}")
        _check_positive_float(self, ["rotary_emb_base"])
        if self.softmax_scale is not None:
            _check_positive_float(self, ["softmax_scale"])

    @property
    def qkv_dim(self) -> int:
        """Channels of [q; k; v] (and of the optional conv)."""
        return self.head_dim * (self.num_heads + 2 * self.num_heads_kv)

    @property
    def out_dim(self) -> int:
        """Channels of the attention output (num_heads x head_dim)."""
        return self.head_dim * self.num_heads

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5


@dataclass(frozen=True)
class MLPMixerConfig:
    """A block whose only sublayer is a plain MLP (Nemotron-H's "-" layers): ``fc2(act(fc1(x)))``
    of width ``d_intermediate``, ``act`` squared ReLU (``"relu2"``); no state. It takes a mixer's
    place in the block, after the block's norm."""

    kind: ClassVar[str] = "mlp"
    d_intermediate: int
    activation: str = "relu2"
    bias: bool = False

    def __post_init__(self):
        _check_ints(self, ["d_intermediate"])
        if self.activation != "relu2":
            raise ValueError(f"activation must be 'relu2', got {self.activation!r}")


@dataclass(frozen=True)
class MoEMixerConfig:
    """A block whose only sublayer is a mixture of experts (Nemotron-H's "E" layers): ``moe``, a
    :class:`MoEConfig`; no state. It takes a mixer's place in the block, after the block's norm."""

    kind: ClassVar[str] = "moe"
    moe: "MoEConfig"

    def __post_init__(self):
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be a MoEConfig, got {self.moe!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Attention and a Mamba-2 SSM side by side on the same normed input, their outputs summed
    (Falcon-H1's blocks). The state is the pair of their states."""

    kind: ClassVar[str] = "parallel"
    attn: AttnConfig
    ssm: Mamba2Config

    def __post_init__(self):
        if not isinstance(self.attn, AttnConfig) or not isinstance(self.ssm, Mamba2Config):
            raise ValueError(f"a parallel mixer takes an AttnConfig and a Mamba2Config, got {self.attn!r}, {self.ssm!r}")


MixerConfig = Union[Mamba1Config, Mamba2Config, Mamba3Config, AttnConfig, MLPMixerConfig, MoEMixerConfig,
                    ParallelConfig]
MIXER_CONFIGS: tuple[type, ...] = (Mamba1Config, Mamba2Config, Mamba3Config, AttnConfig, MLPMixerConfig,
                                   MoEMixerConfig, ParallelConfig)


@dataclass(frozen=True)
class MLPConfig:
    """mamba_ssm's ``GatedMLP`` after a mixer: ``fc2(y * silu(gate))``, ``[y; gate] = fc1(x)``,
    hidden width ``d_intermediate`` as built, no biases."""

    d_intermediate: int

    def __post_init__(self):
        _check_ints(self, ["d_intermediate"])


@dataclass(frozen=True)
class MoEConfig:
    """A mixture of experts: a router ``[num_experts, D]`` picks ``top_k`` experts per token; each
    expert is an MLP of width ``d_expert``; when ``d_shared > 0`` a shared expert of that width runs
    for every token. No biases but the shared expert's (``shared_bias``).

    ``experts``: ``"gated"`` (Granite 4.0-H: ``fc2_e(y * silu(gate))``, ``[y; gate] = fc1_e(x)``;
    the shared expert gated too) or ``"relu2"`` (Nemotron-H: ``fc2_e(relu(fc1_e(x))^2)``, and the
    shared expert). ``router``: ``"softmax"`` (logits in the model dtype, then fp32; the weights are
    the softmax over the chosen logits), ``"softmax_all"`` (Jamba: the softmax over all experts' fp32
    logits, the chosen probabilities not renormalised, rounded to the model dtype) or ``"sigmoid"`` (Nemotron-H: fp32 logits, scores
    ``sigmoid``; the choice by score plus a learned correction bias, among the ``topk_group`` of
    ``n_group`` groups of experts whose two best biased scores sum highest; weights the chosen
    scores, divided by their sum when ``norm_topk``, times ``scaling``). ``d_latent > 0`` (Nemotron-H's
    ``moe_latent_size``): the routed experts work in a narrower space, entered and left through two
    linear maps (biases by ``shared_bias``); the router and the shared expert read the full width."""

    num_experts: int
    top_k: int
    d_expert: int
    d_shared: int = 0
    experts: str = "gated"
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk: bool = True
    scaling: float = 1.0
    shared_bias: bool = False
    d_latent: int = 0

    def __post_init__(self):
        _check_ints(self, ["num_experts", "top_k", "d_expert", "n_group", "topk_group"])
        _check_ints(self, ["d_shared", "d_latent"], minimum=0)
        _check_positive_float(self, ["scaling"])
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        if self.experts not in ("gated", "relu2") or self.router not in ("softmax", "softmax_all", "sigmoid"):
            raise ValueError(f"experts must be 'gated' or 'relu2' and router 'softmax', 'softmax_all' or 'sigmoid', "
                             f"got {self.experts!r} and {self.router!r}")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(f"n_group = {self.n_group} must divide num_experts = {self.num_experts} and be at "
                             f"least topk_group = {self.topk_group}")


@dataclass(frozen=True)
class SharedBlockConfig:
    """A transformer block whose weights several layers share (Zamba2's): it reads the
    concatenation [stream; original embedding] (2 D channels), ``attn`` over that RMS-normed input
    (its output D channels), an RMSNorm, then a gated MLP ``fc2(act(gate) * up)`` with
    ``[gate; up] = fc1(x)`` of width ``d_intermediate`` (``activation`` "gelu", exact). No residual
    inside: its output is a branch that the using layer adds to its mixer's input."""

    attn: AttnConfig
    d_intermediate: int
    activation: str = "gelu"
    mlp_bias: bool = False

    def __post_init__(self):
        if not isinstance(self.attn, AttnConfig):
            raise ValueError(f"attn must be an AttnConfig, got {self.attn!r}")
        _check_ints(self, ["d_intermediate"])
        if self.activation != "gelu":
            raise ValueError(f"activation must be 'gelu', got {self.activation!r}")


@dataclass(frozen=True)
class SharedUseConfig:
    """A layer's use of shared block ``block``: its own low-rank adapters of rank ``rank`` (added to
    the block's [gate; up] projection, and to q, k and v when ``attn_adapters``) and its own linear
    map of the block's output (D x D)."""

    block: int
    rank: int
    attn_adapters: bool = False

    def __post_init__(self):
        _check_ints(self, ["rank"])
        _check_ints(self, ["block"], minimum=0)


@dataclass(frozen=True)
class LayerConfig:
    """One block: ``residual += x; x = mixer(norm(residual))``, then with an MLP
    ``residual += x; x = mlp(norm2(residual))``. With ``shared`` (Zamba2's hybrid layers), the
    mixer reads ``norm(residual + t)`` instead, ``t`` the output of a shared block
    (:class:`SharedUseConfig`) on the stream and the embeddings; ``t`` does not join the stream."""

    mixer: MixerConfig
    mlp: MLPConfig | MoEConfig | None = None
    shared: SharedUseConfig | None = None

    def __post_init__(self):
        if not isinstance(self.mixer, MIXER_CONFIGS):
            raise ValueError(f"mixer must be one of {[c.__name__ for c in MIXER_CONFIGS]}, got {self.mixer!r}")
        if self.mlp is not None and not isinstance(self.mlp, (MLPConfig, MoEConfig)):
            raise ValueError(f"mlp must be an MLPConfig, a MoEConfig or None, got {self.mlp!r}")
        if self.shared is not None and not isinstance(self.shared, SharedUseConfig):
            raise ValueError(f"shared must be a SharedUseConfig or None, got {self.shared!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A stack of layers between a token embedding ``[vocab_size, d_model]`` and an LM head.

    ``vocab_size`` is the rows as stored (padded, e.g. 50280). The block norms and the final norm
    are RMSNorm (``rms_norm``) or LayerNorm with ``norm_eps``; the residual stream is fp32 when
    ``residual_in_fp32``; the LM head is the embedding when ``tie_embeddings``. Runtime choices
    (dtype, device, kernels, batch invariance) are not part of it.
    """

    d_model: int
    vocab_size: int
    layers: tuple[LayerConfig, ...]
    rms_norm: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    # µP-style scalings (Granite 4.0-H): the embedding output, every mixer's and MLP's output
    # before it joins the residual stream, and the logits.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_multiplier: float = 1.0
    # Transformer blocks that layers share (Zamba2), used by the layers whose ``shared`` names them.
    shared_blocks: tuple[SharedBlockConfig, ...] = ()

    def __post_init__(self):
        _check_ints(self, ["d_model", "vocab_size"])
        _check_positive_float(self, ["norm_eps", "embedding_multiplier", "residual_multiplier", "logits_multiplier"])
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f"layers must be a non-empty tuple of LayerConfig, got {self.layers!r}")
        if not isinstance(self.shared_blocks, tuple) or not all(
                isinstance(b, SharedBlockConfig) for b in self.shared_blocks):
            raise ValueError(f"shared_blocks must be a tuple of SharedBlockConfig, got {self.shared_blocks!r}")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerConfig):
                raise ValueError(f"layer {i} must be a LayerConfig, got {type(layer).__name__}")
            if layer.shared is not None and layer.shared.block >= len(self.shared_blocks):
                raise ValueError(f"layer {i} uses shared block {layer.shared.block}, but there are "
                                 f"{len(self.shared_blocks)}")

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def shared_uses(self, block: int) -> tuple[int, ...]:
        """The indices of the layers that use shared block ``block``."""
        return tuple(i for i, layer in enumerate(self.layers)
                     if layer.shared is not None and layer.shared.block == block)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The distinct mixer kinds, in order of first appearance."""
        return tuple(dict.fromkeys(layer.mixer.kind for layer in self.layers))

    def mixers(self, kind: str) -> list:
        """The mixer configs of the layers of one kind."""
        return [layer.mixer for layer in self.layers if layer.mixer.kind == kind]

    def layer_indices(self, kind: str) -> tuple[int, ...]:
        """The indices of the layers whose mixer is of one kind."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.mixer.kind == kind)


def mamba_stack(
    *, arch: str, d_model: int, n_layer: int, vocab_size: int, d_state: int | None = None, d_conv: int = 4,
    expand: int = 2, dt_rank: int | str = "auto", headdim: int = 64, ngroups: int = 1, chunk_size: int = 256,
    conv_bias: bool = True, proj_bias: bool = False, rms_norm: bool = True, norm_eps: float = 1e-5,
    residual_in_fp32: bool = True, tie_embeddings: bool = True, bcdt_rmsnorm: bool = False,
    bcdt_rmsnorm_eps: float = 1e-6, d_intermediate: int = 0, attn_layer_idx=(), attn: AttnConfig | None = None,
    mamba3: Mamba3Config | None = None,
) -> ModelConfig:
    """The uniform stack of mamba_ssm's ``MixerModel``: ``n_layer`` Mamba-1 (``arch="mamba1"``) or
    Mamba-2 (``"mamba2"``) mixers of width ``d_inner = expand * d_model``, the layers of
    ``attn_layer_idx`` attention (``attn``) instead, and a gated MLP of width ``d_intermediate``
    after every mixer when it is positive. Defaults are mamba_ssm's (``d_state`` 16 for Mamba-1,
    128 for Mamba-2; ``dt_rank`` ``ceil(d_model / 16)``). ``arch="mamba3"`` takes its mixer whole
    (``mamba3``, a Mamba3Config; the Mamba-1/2 arguments do not apply to it)."""
    if arch not in ("mamba1", "mamba2", "mamba3"):
        raise ValueError(f"arch must be 'mamba1', 'mamba2' or 'mamba3', got {arch!r}")
    _check_ints(type("args", (), {"d_model": d_model, "n_layer": n_layer, "expand": expand})(),
                ["d_model", "n_layer", "expand"])
    d_inner = expand * d_model
    if arch == "mamba3":
        if not isinstance(mamba3, Mamba3Config):
            raise ValueError("arch='mamba3' needs mamba3, its Mamba3Config")
        mixer = mamba3
    elif arch == "mamba1":
        mixer = Mamba1Config(
            d_inner=d_inner, dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
            d_state=16 if d_state is None else d_state, d_conv=d_conv, conv_bias=conv_bias, proj_bias=proj_bias,
            bcdt_rmsnorm=bcdt_rmsnorm, bcdt_rmsnorm_eps=bcdt_rmsnorm_eps)
    else:
        if bcdt_rmsnorm:
            raise ValueError("bcdt_rmsnorm (Falcon-Mamba's norms of B, C and Δ) exists for Mamba-1 only")
        mixer = Mamba2Config(
            d_inner=d_inner, d_state=128 if d_state is None else d_state, d_conv=d_conv, headdim=headdim,
            ngroups=ngroups, chunk_size=chunk_size, conv_bias=conv_bias, proj_bias=proj_bias, norm_eps=norm_eps)
    idx = tuple(attn_layer_idx)
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layer for i in idx):
        raise ValueError(f"attn_layer_idx must hold layer indices in [0, {n_layer}), got {list(idx)}")
    if len(set(idx)) != len(idx) or list(idx) != sorted(idx):
        raise ValueError(f"attn_layer_idx must be increasing without repeats, got {list(idx)}")
    if idx and not isinstance(attn, AttnConfig):
        raise ValueError("attn_layer_idx lists attention layers but attn (their AttnConfig) is missing")
    if not isinstance(d_intermediate, int) or isinstance(d_intermediate, bool) or d_intermediate < 0:
        raise ValueError(f"d_intermediate must be a non-negative integer, got {d_intermediate!r}")
    mlp = MLPConfig(d_intermediate) if d_intermediate > 0 else None
    layers = tuple(LayerConfig(attn if i in idx else mixer, mlp) for i in range(n_layer))
    return ModelConfig(d_model=d_model, vocab_size=vocab_size, layers=layers, rms_norm=rms_norm, norm_eps=norm_eps,
                       residual_in_fp32=residual_in_fp32, tie_embeddings=tie_embeddings)
