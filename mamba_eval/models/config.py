"""The architecture of a Mamba / Mamba-2 language model, independent of any checkpoint format.

Checkpoint dialects (mamba_ssm's ``config.json``, transformers' ``MambaConfig`` /
``Mamba2Config`` / ``FalconMambaConfig``) are translated into this one dataclass by
``mamba_eval.models.checkpoint``; nothing else reads them.

Beyond the plain stack of Mamba blocks it describes the variants that were released:

- Falcon-Mamba: Mamba-1 with a weightless RMSNorm on Δ (before its up-projection), B and C
  (``bcdt_rmsnorm``).
- mamba_ssm hybrids (e.g. ``mamba2attn-2.7b``): the layers listed in ``attn_layer_idx`` are causal
  multi-head attention (``AttnConfig``) instead of Mamba mixers, and ``d_intermediate > 0`` adds a
  gated MLP with its own pre-norm after every mixer.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("mamba1", "mamba2")


def _check_positive(owner: object, names) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class AttnConfig:
    """A causal multi-head attention mixer as mamba_ssm's ``MHA`` builds it.

    ``in_proj`` maps D to [q (num_heads x head_dim); k; v (num_heads_kv x head_dim each)] and,
    when ``mlp_dim > 0``, a parallel gated MLP's [up; gate] (``mlp_dim`` rows, split in halves);
    an optional depthwise causal conv of width ``d_conv`` (with bias, no activation) runs over
    the q/k/v channels; rotary embeddings rotate the first ``rotary_emb_dim`` channels of each q
    and k head (GPT-NeoX halves, or even/odd pairs when ``rotary_emb_interleaved``); ``out_proj``
    maps [attention output; MLP output] back to D. K/V heads are shared by groups of
    ``num_heads / num_heads_kv`` query heads (grouped-query attention).
    """

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
        _check_positive(self, ["num_heads", "num_heads_kv", "head_dim"])
        if self.num_heads % self.num_heads_kv != 0:
            raise ValueError(f"num_heads = {self.num_heads} is not a multiple of num_heads_kv = {self.num_heads_kv}")
        for name in ("rotary_emb_dim", "d_conv", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.rotary_emb_dim % 2 or self.rotary_emb_dim > self.head_dim:
            raise ValueError(
                f"rotary_emb_dim must be even and at most head_dim = {self.head_dim}, got {self.rotary_emb_dim}"
            )
        if self.mlp_dim % 2:
            raise ValueError(f"mlp_dim must be even (it is split into up and gate halves), got {self.mlp_dim}")
        if not self.rotary_emb_base > 0:
            raise ValueError(f"rotary_emb_base must be positive, got {self.rotary_emb_base!r}")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive or None, got {self.softmax_scale!r}")

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
class MambaConfig:
    """Architecture of a stack of ``n_layer`` Mamba blocks between an embedding and an LM head.

    Sizes that follow from the others are properties: ``d_inner``, ``nheads``, ``conv_dim``,
    ``d_in_proj``. Runtime choices (dtype, device, kernel backend) are not part of it. The fields
    after ``tie_embeddings`` describe the released variants (module docstring); their defaults
    give the plain model.
    """

    arch: str  # "mamba1" | "mamba2"
    d_model: int
    n_layer: int
    vocab_size: int  # rows of the embedding / LM head as stored (padded), e.g. 50280
    d_state: int
    d_conv: int
    expand: int
    dt_rank: int  # Mamba-1: rank of the Δ projection; 0 for Mamba-2
    headdim: int  # Mamba-2 head dimension P; 0 for Mamba-1
    ngroups: int  # Mamba-2 number of B/C groups G; 1 for Mamba-1
    chunk_size: int  # Mamba-2 SSD chunk length; 0 for Mamba-1
    conv_bias: bool = True
    proj_bias: bool = False  # bias of in_proj / out_proj
    rms_norm: bool = True  # RMSNorm (True) or LayerNorm (False) for the block norms and norm_f
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    bcdt_rmsnorm: bool = False  # Falcon-Mamba: weightless RMSNorm of Δ (low rank), B and C; Mamba-1 only
    bcdt_rmsnorm_eps: float = 1e-6
    d_intermediate: int = 0  # hidden width of the gated MLP after every mixer, as built (0: no MLP)
    attn_layer_idx: tuple[int, ...] = ()  # layers that are attention instead of Mamba mixers
    attn: AttnConfig | None = None  # their shape (required when attn_layer_idx is not empty)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        positive = ["d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"]
        positive += ["dt_rank"] if self.arch == "mamba1" else ["headdim", "ngroups", "chunk_size"]
        _check_positive(self, positive)
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.bcdt_rmsnorm and self.arch != "mamba1":
            raise ValueError("bcdt_rmsnorm (Falcon-Mamba's norms of B, C and Δ) exists for Mamba-1 only")
        if not self.bcdt_rmsnorm_eps > 0:
            raise ValueError(f"bcdt_rmsnorm_eps must be positive, got {self.bcdt_rmsnorm_eps!r}")
        if not isinstance(self.d_intermediate, int) or isinstance(self.d_intermediate, bool) or self.d_intermediate < 0:
            raise ValueError(f"d_intermediate must be a non-negative integer, got {self.d_intermediate!r}")
        if not isinstance(self.attn_layer_idx, tuple):
            raise ValueError(f"attn_layer_idx must be a tuple of layer indices, got {self.attn_layer_idx!r}")
        idx = self.attn_layer_idx
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layer for i in idx):
            raise ValueError(f"attn_layer_idx must hold layer indices in [0, {self.n_layer}), got {list(idx)}")
        if len(set(idx)) != len(idx) or list(idx) != sorted(idx):
            raise ValueError(f"attn_layer_idx must be increasing without repeats, got {list(idx)}")
        if idx and self.attn is None:
            raise ValueError("attn_layer_idx lists attention layers but attn (their AttnConfig) is None")
        if self.attn is not None and not isinstance(self.attn, AttnConfig):
            raise ValueError(f"attn must be an AttnConfig or None, got {type(self.attn).__name__}")
        if self.arch == "mamba2":
            if self.d_inner % self.headdim != 0:
                raise ValueError(
                    f"d_inner = expand * d_model = {self.d_inner} is not a multiple of headdim = {self.headdim}"
                )
            if self.nheads % self.ngroups != 0:
                raise ValueError(f"nheads = {self.nheads} is not a multiple of ngroups = {self.ngroups}")

    @property
    def d_inner(self) -> int:
        """Width of the expanded branch that is convolved and scanned, ``expand * d_model``."""
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Mamba-2 heads H = d_inner / headdim (0 for Mamba-1)."""
        return self.d_inner // self.headdim if self.arch == "mamba2" else 0

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x (Mamba-1); [x; B; C] (Mamba-2)."""
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """Rows of in_proj: [x; z] (Mamba-1); [z; x; B; C; dt] (Mamba-2)."""
        if self.arch == "mamba1":
            return 2 * self.d_inner
        return self.d_inner + self.conv_dim + self.nheads

    @property
    def has_attention(self) -> bool:
        """Whether some layers are attention (their state is a growing key/value cache)."""
        return bool(self.attn_layer_idx)
