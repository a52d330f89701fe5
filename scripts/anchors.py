"""Stored peer figures, copied from ``../shared/reference/anchors.md``: the only measured numbers
the scripts keep.

They are for orientation when a peer (mamba_ssm, causal_conv1d, lm-eval's ``mamba_ssm`` wrapper)
cannot be imported in the run: a script then shows the stored figure in its own column, labelled
with the machine and date it was measured on, and takes no ratio or share from it. Every ratio to a
peer comes from the peer measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    machine: str
    date: str
    gpu: str  # a part of torch.cuda.get_device_name() on that kind of chip

    @property
    def label(self) -> str:
        return f"stored: {self.machine}, {self.date} (../shared/reference/anchors.md), not measured in this run"


H200 = Source("one NVIDIA H200", "2026-11-28", "H200")
H100 = Source("one NVIDIA H100 80GB HBM3", "2026-12-07", "H100")

_FORWARD_BATCHES = ((64, 128), (256, 128), (16, 2048), (1, 16384))


def _forward(figures: dict[str, tuple]) -> dict:
    return {(shape, b, l): v for shape, row in figures.items() for (b, l), v in zip(_FORWARD_BATCHES, row)}


def _decode(figures: dict[str, tuple]) -> dict:
    return {(shape, batch): v for shape, row in figures.items() for batch, v in zip((1, 64), row)}


def _kernels(rows: list[tuple[str, str, tuple]]) -> dict:
    shapes = {"conv": "C=5120 K=4 B={} L={}", "scan1536": "D=1536 N=16 B={} L={}",
              "scan5120": "D=5120 N=16 B={} L={}", "ssd24": "H=24 P=64 N=128 B={} L={}",
              "ssd80": "H=80 P=64 N=128 B={} L={}"}
    seq = ((64, 128), (16, 2048), (1, 16384))
    out = {}
    for op, kind, values in rows:
        for (b, l), ms in zip(seq, values):
            out[(op, shapes[kind].format(b, l))] = ms
    return out


#: measure -> [(source, {key: figure})], the source of the running GPU's kind first when there is one.
#: eval: lm-eval's mamba_ssm wrapper on full HellaSwag, shape -> (whole process s, loglikelihood phase s);
#: model: MambaLMHeadModel forward with all-position logits, (shape, batch, length) -> tokens/s;
#: gen: generate(cg=True), prompt 128, 256 new tokens, (shape, batch) -> ms per token;
#: kernels: median ms (triton.testing.do_bench), (our op, our shape label) -> ms.
FIGURES: dict[str, list[tuple[Source, dict]]] = {
    "eval": [
        (H100, {"mamba-130m": (58.8, 35.0), "mamba-2.8b": (167.2, 133.0)}),
        (H200, {"mamba-130m": (80.0, 43.0), "mamba-2.8b": (170.0, 137.0)}),
    ],
    "model": [
        (H100, _forward({"mamba-130m": (478e3, 607e3, 823e3, 704e3), "mamba-2.8b": (52.3e3, 53.3e3, 66.9e3, 62.7e3),
                         "mamba2-130m": (209e3, 767e3, 846e3, 330e3),
                         "mamba2-2.7b": (67.4e3, 65.3e3, 77.0e3, 78.1e3)})),
        (H200, _forward({"mamba-130m": (409e3, 623e3, 865e3, 750e3), "mamba-2.8b": (53.5e3, 54.1e3, 68.4e3, 66.1e3),
                         "mamba2-130m": (260e3, 850e3, 763e3, 471e3),
                         "mamba2-2.7b": (72.2e3, 69.0e3, 79.4e3, 80.5e3)})),
    ],
    "gen": [
        (H100, _decode({"mamba-130m": (0.664, 0.853), "mamba-2.8b": (3.720, 5.110), "mamba2-130m": (0.614, 1.282),
                        "mamba2-2.7b": (3.419, 9.981)})),
        (H200, _decode({"mamba-130m": (0.71, 0.82), "mamba-2.8b": (3.18, 4.68), "mamba2-130m": (0.53, 1.23),
                        "mamba2-2.7b": (2.94, 9.60)})),
    ],
    "kernels": [
        (H200, {**_kernels([("causal_conv1d", "conv", (0.296, 0.181, 0.095)),
                            ("selective_scan", "scan1536", (0.309, 0.878, 0.565)),
                            ("selective_scan", "scan5120", (1.004, 2.883, 1.888)),
                            ("ssd_scan", "ssd24", (0.463, 0.534, 0.697)),
                            ("ssd_scan", "ssd80", (0.686, 1.665, 0.794))]),
                ("add_rmsnorm", "32768 x 2560, fp32 residual"): 0.244,
                ("selective_state_update", "D=5120 N=16 B=64"): 0.054,
                ("ssd_state_update", "H=80 P=64 N=128 B=64"): 0.151}),
    ],
}

#: How a stored kernel figure's setup differs from the row it stands beside.
KERNEL_NOTES = {
    "ssd_scan": "the stored mamba_ssm figure includes the z gate (x, z, y read/written)",
    "selective_state_update": "the stored mamba_ssm figure is for a bf16 state (fp32 here)",
    "ssd_state_update": "the stored mamba_ssm figure is for a bf16 state (fp32 here)",
}


def stored(measure: str, key, gpu: str | None = None) -> tuple[object, Source] | None:
    """``(figure, source)`` for ``key`` of ``measure``, from the running GPU's kind when stored,
    else from another machine; None when no figure is stored."""
    sources = FIGURES.get(measure, [])
    ordered = sorted(sources, key=lambda s: not (gpu and s[0].gpu in gpu))
    for source, figures in ordered:
        if key in figures:
            return figures[key], source
    return None

