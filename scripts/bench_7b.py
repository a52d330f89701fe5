"""The 7B Mamba-family shapes on one GPU: parameters, memory, forward tokens/s and decode ms/token.

Shapes (random-init weights, bf16, triton backend), read by our loader from the published
``config.json`` fields: Falcon-Mamba-7B and Mamba-Codestral-7B, beside mamba-2.8b, mamba2-2.7b
and the hybrid mamba2attn-2.7b. For each: the parameter count (built on the meta device), the
weights' memory and the peak memory of the runs; the Triton model checked against the reference
backend on the same weights; forward with all-position logits (bf16, as ``scripts/bench_model.py``
times it) at B=1, L=2048 and B=8, L=2048 in tokens/s with the share of this GPU's bf16 matmul
peak measured in the run (``bench_common.peaks``; 2 FLOP per weight per token); cached greedy decoding through ``mamba_eval.harness.generation.generate``
(prompt 128, 256 new tokens, no EOS) at batch 1 and 64, eagerly and with CUDA graphs, in ms per
generated token (whole ``generate`` call after a first call that compiles and captures). Prints a
table and writes JSON (``--json``).

    python scripts/bench_7b.py --json bench_7b.json [--shapes falcon-mamba-7b,mamba-codestral-7b]
    python scripts/bench_7b.py --tiny        # the same code path at toy sizes on the CPU (no timings worth reading)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import matmul_share, median_seconds, run_info, write_json  # noqa: E402

# Published config.json fields (mamba_eval.models.releases), by shape.
CONFIGS = ("mamba-2.8b", "mamba2-2.7b", "mamba2attn-2.7b", "falcon-mamba-7b", "mamba-codestral-7b")
# Toy versions for --tiny: same fields, small sizes.
TINY = {
    "mamba-2.8b": {"d_model": 64, "n_layer": 2},
    "mamba2-2.7b": {"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "chunk_size": 16}},
    "mamba2attn-2.7b": {"d_model": 64, "n_layer": 3, "attn_layer_idx": [1],
                        "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "chunk_size": 16},
                        "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 4, "out_proj_bias": False,
                                     "qkv_proj_bias": False, "rotary_emb_dim": 8}},
    "falcon-mamba-7b": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "time_step_rank": 8,
                        "vocab_size": 512},
    "mamba-codestral-7b": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 8, "head_dim": 16,
                           "chunk_size": 16, "vocab_size": 512},
}
FORWARD_BATCHES = [(1, 2048), (8, 2048)]
DECODE_BATCHES = [1, 64]
PROMPT, NEW = 128, 256


def read_shape(name: str, tiny: bool):
    from mamba_eval.models.checkpoint import read_config
    from mamba_eval.models.releases import release

    raw = release(name, **(TINY[name] if tiny else {}))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        return read_config(folder)


def matmul_params(model) -> int:
    """Weights that take part in a matmul per token (the LM head counted even when tied)."""
    total = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embedding" not in n
                and "A_log" not in n)
    return total + (model.lm_head.weight.numel() if model.config.tie_embeddings else 0)


@torch.inference_mode()
def logits_forward(model, ids):
    hidden, _ = model.backbone_forward(ids)
    return torch.nn.functional.linear(hidden, model.lm_head.weight)


@torch.inference_mode()
def check_against_reference(model, device, vocab) -> float:
    """Relative max error of the model's logits against the reference backend on the same weights."""
    from mamba_eval.models.model import LanguageModel

    ref = LanguageModel(model.config, backend="ref", device="meta", dtype=model.dtype)
    ref.load_state_dict(model.state_dict(), assign=True)  # the same tensors, no copy
    ref.tie_weights()
    ids = torch.randint(0, vocab, (2, 300), device=device)
    a, _ = model(ids)
    b, _ = ref(ids)
    return float((a - b).abs().max() / b.abs().max())


def bench_decode(model, batch: int, cuda_graphs: bool, device, vocab: int, prompt: int, new: int) -> dict:
    from mamba_eval.harness.generation import generate

    prompts = torch.randint(2, vocab, (batch, prompt)).tolist()
    kw = dict(batch_size=batch, device=device, cuda_graphs=cuda_graphs)
    try:
        generate(model, prompts, max_new_tokens=4, **kw)  # compile kernels, capture graphs
    except ValueError as err:  # a decoder that cannot hold attention layers' key/value caches yet
        if "max_length" not in str(err):
            raise
        return {"skipped": f"generation does not support this model yet: {err}"}
    outs = []

    def run():
        outs[:] = generate(model, prompts, max_new_tokens=new, **kw)

    seconds = median_seconds(run, reps=1, warmup=1, device=device)
    if any(len(o) != new for o in outs):
        raise RuntimeError(f"expected {new} tokens per row, got {sorted({len(o) for o in outs})}")
    return {"ms_per_token": 1e3 * seconds / new}


def bench_shape(name: str, args, device: torch.device) -> dict:
    from mamba_eval.models.model import LanguageModel

    cfg = read_shape(name, args.tiny)
    n_params = sum(p.numel() for p in LanguageModel(cfg, device="meta").parameters())
    dtype = torch.float32 if args.tiny else torch.bfloat16
    backend = "ref" if device.type == "cpu" else "triton"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = LanguageModel(cfg, backend=backend, device=device, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"shape": name, "params": n_params, "weights_GiB": weight_bytes / 2**30, "backend": backend,
           "dtype": str(dtype).removeprefix("torch."), "attention_layers": list(cfg.layer_indices("attention"))}
    vocab = min(cfg.vocab_size, 32000)
    if backend != "ref":
        out["rel_err_vs_ref"] = check_against_reference(model, device, vocab)
    flop_per_token = 2 * matmul_params(model)
    out["forward"] = []
    for batch, length in args.forward_batches:
        ids = torch.randint(0, vocab, (batch, length), device=device)
        seconds = median_seconds(lambda: logits_forward(model, ids), reps=args.reps, warmup=1, device=device)
        tps = batch * length / seconds
        out["forward"].append({"batch": batch, "length": length, "tokens_per_s": tps,
                               "roofline_share": matmul_share(tps * flop_per_token) if device.type == "cuda" else None})
    out["decode"] = []
    if not args.no_decode:
        for batch in args.decode_batches:
            for graphs in ([False, True] if device.type == "cuda" else [False]):
                res = bench_decode(model, batch, graphs, device, vocab, args.prompt, args.new)
                out["decode"].append({"batch": batch, "cuda_graphs": graphs, **res})
    if device.type == "cuda":
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    return out


def print_table(results: list[dict]) -> None:
    print(f"\n{'shape':<20} {'params':>7} {'weights':>8} {'peak':>7}  forward tokens/s (roofline share)")
    for r in results:
        fwd = "  ".join(f"B={f['batch']},L={f['length']}: {f['tokens_per_s'] / 1e3:.1f}k "
                        f"({'-' if f['roofline_share'] is None else format(f['roofline_share'], '.0%')})"
                        for f in r["forward"])
        peak = f"{r['peak_GiB']:.1f}G" if "peak_GiB" in r else "-"
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f}M"
        print(f"{r['shape']:<20} {params:>7} {r['weights_GiB']:>7.2f}G {peak:>7}  {fwd}")
    print(f"\n{'shape':<20} {'batch':>5} {'eager ms/tok':>13} {'graphs ms/tok':>14}")
    for r in results:
        for batch in sorted({d["batch"] for d in r["decode"]}):
            cells = {}
            for d in r["decode"]:
                if d["batch"] == batch:
                    cells[d["cuda_graphs"]] = f"{d['ms_per_token']:.2f}" if "ms_per_token" in d else "skipped"
            print(f"{r['shape']:<20} {batch:>5} {cells.get(False, '-'):>13} {cells.get(True, '-'):>14}")
    for r in results:
        if "rel_err_vs_ref" in r:
            print(f"{r['shape']}: Triton vs reference backend, relative max error of logits {r['rel_err_vs_ref']:.2e}")
        for d in r["decode"]:
            if "skipped" in d:
                print(f"{r['shape']} decode batch {d['batch']}: {d['skipped']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the script, not the speed")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in CONFIGS]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(CONFIGS)}")
    if args.tiny:
        device = torch.device("cpu")
        args.forward_batches, args.decode_batches, args.prompt, args.new = [(1, 64), (2, 64)], [1, 3], 8, 6
        args.reps = min(args.reps, 2)
    else:
        if not torch.cuda.is_available():
            print("bench_7b.py needs a CUDA GPU (or --tiny for a CPU check of the script)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        args.forward_batches, args.decode_batches, args.prompt, args.new = FORWARD_BATCHES, DECODE_BATCHES, PROMPT, NEW
    results = []
    for name in shapes:
        results.append(bench_shape(name, args, device))
        print(json.dumps(results[-1]), flush=True)
    print_table(results)
    if args.json:
        info = run_info(device, with_peaks=device.type == "cuda")
        write_json(args.json, {**info, "tiny": args.tiny, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
