"""Mamba-3 beside mamba_ssm's own implementation on the same random weights: logits, then speed.

mamba_ssm's PyPI release has no Mamba-3 language model; its source tree does (the ``Mamba3``
module with its Triton SISO kernels; MIMO needs TileLang, its decoding step CuTe-DSL). Point
``--reference`` at a checkout of that tree (github.com/state-spaces/mamba; nothing of it is
compiled for the SISO forward: its Python files are put first on the import path). For each
shape: one random checkpoint in mamba_ssm's format (``mamba_eval.models.releases``), with
``A_activation: heavy_tail``, the activation of the data-dependent A in that source tree, is
loaded by both; then

- correctness: per-token fp32 logits of ours (reference ops, and the Triton kernels with
  ``--mamba3-kernels``) against theirs in fp32, and ours in bf16 against theirs in fp32, as the
  relative max error over a [2, 512] batch;
- prefill: tokens/s of the backbone's hidden states, bf16, at the batch shapes (the LM head is
  the same matrix product in both and is left out), ours and theirs in the same run;
- decoding: ms per token at batch 1 and 64, ours only unless their step imports (CuTe-DSL).

    python scripts/bench_mamba3.py --reference /path/to/mamba --json bench_mamba3.json \\
        [--shapes mamba3-siso-187m,mamba3-siso-1.5b] [--mamba3-kernels]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import format_table, median_seconds, run_info, write_json  # noqa: E402

from mamba_eval.models.releases import release, write_random_checkpoint  # noqa: E402

SHAPES = ("mamba3-siso-187m", "mamba3-siso-1.5b")
BATCHES = [(16, 2048), (64, 128)]
VOCAB = 128256  # the releases' Llama-3.1 vocabulary


def their_model(raw: dict, folder: Path, dtype, device):
    """mamba_ssm's MambaLMHeadModel of ``raw``, with the checkpoint's weights."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    fields = {f.name for f in dataclasses.fields(MambaConfig)}
    model = MambaLMHeadModel(MambaConfig(**{k: v for k, v in raw.items() if k in fields}), device=device,
                             dtype=dtype).eval()
    state = torch.load(folder / "pytorch_model.bin", map_location=device, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@torch.inference_mode()
def compare(raw, folder, device, use_kernels: bool) -> dict:
    from mamba_eval.models.checkpoint import load_model

    ids = torch.randint(0, VOCAB, (2, 512), device=device, generator=torch.Generator(device).manual_seed(0))
    theirs = their_model(raw, folder, torch.float32, device)
    expected = theirs(ids).logits.float()
    del theirs
    out = {}
    runs = [("ours fp32, reference ops", "float32", "ref")]
    if use_kernels:
        runs.append(("ours fp32, Triton kernels", "float32", "triton"))
    runs.append(("ours bf16, default backend", "bfloat16", "triton"))
    for name, dtype, backend in runs:
        model = load_model(folder, dtype=dtype, device=device, backend=backend)
        logits, _ = model(ids)
        out[name] = rel_err(logits, expected)
        del model
    return out


@torch.inference_mode()
def prefill(raw, folder, device, reps: int) -> list[dict]:
    from mamba_eval.models.checkpoint import load_model

    ours = load_model(folder, dtype="bfloat16", device=device, backend="triton")
    theirs = their_model(raw, folder, torch.bfloat16, device)
    rows = []
    for batch, length in BATCHES:
        ids = torch.randint(0, VOCAB, (batch, length), device=device)
        t_ours = median_seconds(lambda: ours.backbone_forward(ids), reps=reps, device=device)
        t_theirs = median_seconds(lambda: theirs.backbone(ids), reps=reps, device=device)
        rows.append({"batch": batch, "length": length, "ours_tok_s": batch * length / t_ours,
                     "mamba_ssm_tok_s": batch * length / t_theirs, "ratio": t_theirs / t_ours})
    return rows


@torch.inference_mode()
def decode(folder, device, reps: int) -> list[dict]:
    from mamba_eval.models.checkpoint import load_model

    model = load_model(folder, dtype="bfloat16", device=device, backend="triton")
    rows = []
    for batch in (1, 64):
        state = model.allocate_state(batch)
        ids = torch.randint(0, VOCAB, (batch,), device=device)
        steps = 32
        seconds = median_seconds(lambda: [model.step(ids, state) for _ in range(steps)], reps=reps, device=device)
        rows.append({"batch": batch, "ours_ms_per_token": 1e3 * seconds / steps})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="a checkout of mamba_ssm's source tree (with mamba_ssm/)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="releases of mamba_eval.models.releases")
    ap.add_argument("--mamba3-kernels", action="store_true",
                    help="also run our Triton Mamba-3 kernels (the model uses the reference ops until they are "
                         "validated on a GPU)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work-dir", help="where the random checkpoints go (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_mamba3.py needs a CUDA GPU (mamba_ssm's Mamba-3 kernels run there only)", file=sys.stderr)
        return 2
    reference = Path(args.reference)
    if not (reference / "mamba_ssm" / "modules" / "mamba3.py").is_file():
        print(f"{reference} is not a mamba_ssm source tree with Mamba-3 (mamba_ssm/modules/mamba3.py)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(reference.resolve()))
    if args.mamba3_kernels:
        from mamba_eval.models import ops

        ops._REF_ONLY = ()  # the Triton Mamba-3 kernels in the Triton backend, for this run
    device = torch.device("cuda")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_mamba3_"))
    results = {"run": run_info(device), "shapes": {}}
    for shape in args.shapes.split(","):
        raw = release(shape)
        raw["ssm_cfg"] = {**raw["ssm_cfg"], "A_activation": "heavy_tail"}
        folder = write_random_checkpoint(work / shape, raw, device=device)
        entry = {"check": compare(raw, folder, device, args.mamba3_kernels),
                 "prefill": prefill(raw, folder, device, args.reps), "decode": decode(folder, device, args.reps)}
        results["shapes"][shape] = entry
        print(f"\n{shape}: relative max error of the logits against mamba_ssm's fp32")
        print(format_table(["ours", "rel. error"], [[k, f"{v:.2e}"] for k, v in entry["check"].items()]))
        print(format_table(["batch", "length", "ours tok/s", "mamba_ssm tok/s", "ours / theirs"],
                           [[r["batch"], r["length"], f"{r['ours_tok_s']:.0f}", f"{r['mamba_ssm_tok_s']:.0f}",
                             f"{r['ratio']:.2f}"] for r in entry["prefill"]]))
        print(format_table(["batch", "ours ms/token (decode)"],
                           [[r["batch"], f"{r['ours_ms_per_token']:.2f}"] for r in entry["decode"]]))
        if args.json:
            write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
