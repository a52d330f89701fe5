"""The architecture of a Mamba / Mamba-2 language model, independent of any checkpoint format.

Checkpoint dialects (mamba_ssm's ``config.json``, transformers' ``MambaConfig``/``Mamba2Config``)
are translated into this one dataclass by ``mamba_eval.loader``; nothing else reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("mamba1", "mamba2")


@dataclass(frozen=True)
class MambaConfig:
    """Architecture of a stack of ``n_layer`` Mamba blocks between an embedding and an LM head.

    Sizes that follow from the others are properties: ``d_inner``, ``nheads``, ``conv_dim``,
    ``d_in_proj``. Runtime choices (dtype, device, kernel backend) are not part of it.
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

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        positive = ["d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"]
        positive += ["dt_rank"] if self.arch == "mamba1" else ["headdim", "ngroups", "chunk_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
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
