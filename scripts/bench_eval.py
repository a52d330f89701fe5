"""End-to-end evaluation speed: full HellaSwag validation through ``lm_eval --model mamba``.

The setup of the anchors' end-to-end table (reference/anchors.md): random-init checkpoints at the
published mamba-130m and mamba-2.8b shapes, written in mamba_ssm's format (``config.json`` +
fp32 ``pytorch_model.bin``), the real GPT-NeoX-20B tokenizer, bf16, ``--batch_size 256``, and
HellaSwag's 10,042 validation documents (40,168 loglikelihood requests) read from a local data
folder through ``mamba_eval.harness.offline.prepare_offline_tasks``. Each run is one fresh
``lm_eval`` process; the script reports

- whole process: the wall time of that process, start-up, model load and task building included;
- loglikelihood phase: the time spent inside ``MambaLM.loglikelihood`` (tokenising and scoring);

beside the anchors' figures for lm-eval's ``mamba_ssm`` wrapper, with the engine's counters
(forwards, tokens run, shared contexts) and the accuracies, and writes everything as JSON.

    python scripts/bench_eval.py --json bench_eval.json                       # GPU, both shapes
    python scripts/bench_eval.py --modes shared,unshared --shapes mamba-130m  # context sharing on/off
    python scripts/bench_eval.py --shapes tiny --device cpu --dtype float32 --limit 8 --batch-size 8  # smoke test

``--invariance N`` also scores the first N HellaSwag documents in this process at batch sizes 1,
7, 64 and auto, with and without shared contexts, and reports whether the scores are bit-for-bit
identical across batch sizes (and the largest difference when not).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mamba_eval.models.releases import release, write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Published Mamba-1 shapes (mamba_eval.models.releases), plus a tiny one for smoke tests on the CPU.
SHAPES = {
    "mamba-130m": release("mamba-130m"),
    "mamba-2.8b": release("mamba-2.8b"),
    "tiny": release("mamba-130m", d_model=64, n_layer=2),
}
# lm-eval's `mamba_ssm` wrapper on one H200 (anchors.md): (whole process s, loglikelihood phase s).
ANCHORS = {"mamba-130m": (80.0, 43.0), "mamba-2.8b": (170.0, 137.0)}
ANCHOR_HF_130M_WHOLE = 77.0  # lm-eval `hf` (transformers + mamba_ssm kernels), mamba-130m
TASK = "hellaswag"
MODES = {"shared": "true", "unshared": "false"}


def write_checkpoint(folder: Path, shape: str, device: str) -> Path:
    """A random-init checkpoint of ``shape`` in mamba_ssm's format (reused when already written)."""
    import torch

    config = SHAPES[shape]
    if (folder / "pytorch_model.bin").is_file() and (folder / "config.json").is_file() \
            and json.loads((folder / "config.json").read_text()) == config:
        return folder
    init_device = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return write_random_checkpoint(folder, config, seed=0, device=init_device)


def lm_eval_argv(args, checkpoint: Path, tokenizer: Path, include: Path, mode: str, out_dir: Path) -> list[str]:
    model_args = f"pretrained={checkpoint},tokenizer={tokenizer},dtype={args.dtype},share_context={MODES[mode]}"
    if args.backend:
        model_args += f",backend={args.backend}"
    if args.batch_invariant is not None:
        model_args += f",batch_invariant={args.batch_invariant}"
    argv = ["lm_eval", "--model", "mamba", "--model_args", model_args, "--tasks", TASK,
            "--include_path", str(include), "--batch_size", str(args.batch_size), "--device", args.device,
            "--output_path", str(out_dir)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    return argv


def child(spec_path: str) -> int:
    """One timed lm_eval process: time MambaLM.loglikelihood and collect the engine's counters."""
    t_child = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import mamba_eval.harness.lm as lm_mod
    from mamba_eval.harness.engine import EngineStats

    timing = {"loglikelihood_s": 0.0, "loglikelihood_calls": 0}
    marks: dict[str, float] = {}
    original_init = lm_mod.MambaLM.__init__

    def timed_init(self, *a, **k):
        marks.setdefault("init_start", time.perf_counter())
        try:
            return original_init(self, *a, **k)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["init_end"] = time.perf_counter()

    stats: list[EngineStats] = []
    original_ll, original_score = lm_mod.MambaLM.loglikelihood, lm_mod.score_continuations

    def timed_loglikelihood(self, requests, disable_tqdm: bool = False):
        start = time.perf_counter()
        marks.setdefault("ll_start", start)
        try:
            return original_ll(self, requests, disable_tqdm=disable_tqdm)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["ll_end"] = time.perf_counter()
            timing["loglikelihood_s"] += marks["ll_end"] - start
            timing["loglikelihood_calls"] += 1

    def counted_score(*a, **k):
        stats.append(EngineStats())
        return original_score(*a, stats=stats[-1], **k)

    lm_mod.MambaLM.loglikelihood = timed_loglikelihood
    lm_mod.MambaLM.__init__ = timed_init
    lm_mod.score_continuations = counted_score
    from lm_eval.__main__ import cli_evaluate

    sys.argv = spec["argv"]
    cli_evaluate()
    done = time.perf_counter()
    # Where the process's time goes (the interpreter's own start-up is the parent's whole time minus these).
    phases = {
        "imports_and_task_index_s": marks["init_start"] - t_child,
        "model_load_s": marks["init_end"] - marks["init_start"],
        "task_building_s": marks["ll_start"] - marks["init_end"],
        "loglikelihood_s": marks["ll_end"] - marks["ll_start"],
        "metrics_and_output_s": done - marks["ll_end"],
        "child_total_s": done - t_child,
    }
    result = {**timing, "phases": phases, "engine": [s.__dict__ for s in stats]}
    files = sorted(glob.glob(os.path.join(spec["out_dir"], "**", "results_*.json"), recursive=True))
    if files:
        metrics = json.loads(Path(files[-1]).read_text())["results"].get(TASK, {})
        result["metrics"] = {k.split(",")[0]: v for k, v in metrics.items()
                             if isinstance(v, (int, float)) and "stderr" not in k}
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


def run_one(args, shape: str, mode: str, checkpoint: Path, tokenizer: Path, include: Path, work: Path) -> dict:
    out_dir = work / f"out-{shape}-{mode}"
    spec = {"argv": lm_eval_argv(args, checkpoint, tokenizer, include, mode, out_dir),
            "out_dir": str(out_dir), "result": str(work / f"result-{shape}-{mode}.json")}
    spec_path = work / f"spec-{shape}-{mode}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env,
                          stdout=None if args.verbose else subprocess.PIPE,
                          stderr=None if args.verbose else subprocess.STDOUT, text=True)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "" if args.verbose else proc.stdout[-4000:]
        raise RuntimeError(f"lm_eval run {shape}/{mode} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    engine = result.pop("engine")
    totals = {k: sum(e[k] for e in engine) for k in
              ("requests", "unique", "shared_requests", "forward_calls", "tokens", "padded_tokens", "ooms")}
    anchor = ANCHORS.get(shape)
    return {"shape": shape, "mode": mode, "whole_process_s": whole, **result, **totals,
            "requests_per_s": totals["requests"] / max(result["loglikelihood_s"], 1e-9),
            "anchor_whole_process_s": anchor[0] if anchor else None,
            "anchor_loglikelihood_s": anchor[1] if anchor else None,
            "argv": spec["argv"]}


def check_invariance(args, shape: str, checkpoint: Path, tokenizer_dir: Path, data: Path, n_docs: int) -> dict:
    """Score the first ``n_docs`` HellaSwag documents at several batch sizes; compare the bits."""
    import torch
    from lm_eval.tasks.hellaswag.utils import preprocess
    from transformers import AutoTokenizer

    from mamba_eval.models.ops import default_backend
    from mamba_eval.harness.engine import score_continuations
    from mamba_eval.models.checkpoint import load_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pairs = []
    with open(data / "hellaswag" / "hellaswag_val.jsonl") as f:
        for _, line in zip(range(n_docs), f):
            doc = json.loads(line)
            query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
            ctx = tok.encode(query)
            for ending in doc["endings"]:
                whole = tok.encode(query + " " + preprocess(ending))
                pairs.append((ctx, whole[len(ctx):]))
    device = torch.device(args.device)
    # The batch-invariance policy is the model's, as --model mamba builds it (on unless --batch-invariant false).
    model = load_model(checkpoint, dtype=args.dtype, device=device, backend=args.backend or default_backend(device),
                       batch_invariant=args.batch_invariant != "false")
    out = {"shape": shape, "requests": len(pairs)}
    scores = {}
    for share in (True, False):
        runs = {bs: score_continuations(model, pairs, max_length=2048, batch_size=bs, device=device,
                                        share_context=share) for bs in (1, 7, 64, "auto")}
        scores[share] = runs[1]
        for bs, res in runs.items():
            diff = max(abs(a[0] - b[0]) for a, b in zip(res, runs[1]))
            out[f"{'shared' if share else 'unshared'}_bs{bs}"] = {
                "bitwise_equal_to_bs1": res == runs[1], "max_abs_diff": diff,
                "greedy_equal": [a[1] for a in res] == [b[1] for b in runs[1]]}
    out["shared_vs_unshared_max_abs_diff"] = max(abs(a[0] - b[0]) for a, b in zip(scores[True], scores[False]))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def print_table(runs: list[dict]) -> None:
    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    print(f"\n{'shape':<11} {'mode':<9} {'whole s':>8} {'anchor':>7} {'ll s':>7} {'anchor':>7} "
          f"{'req/s':>8} {'tokens run':>11} {'forwards':>8} {'acc':>6} {'acc_norm':>8}")
    for r in runs:
        m = r.get("metrics", {})
        if r.get("phases"):
            p = r["phases"]
            r.setdefault("_phase_line", "  where the time goes: interpreter start {:.1f} s, imports + task index {:.1f} s, "
                         "model load {:.1f} s, task building {:.1f} s, loglikelihood {:.1f} s, metrics + output {:.1f} s".format(
                             r["whole_process_s"] - p["child_total_s"], p["imports_and_task_index_s"], p["model_load_s"],
                             p["task_building_s"], p["loglikelihood_s"], p["metrics_and_output_s"]))
        print(f"{r['shape']:<11} {r['mode']:<9} {r['whole_process_s']:>8.1f} {fmt(r['anchor_whole_process_s']):>7} "
              f"{r['loglikelihood_s']:>7.1f} {fmt(r['anchor_loglikelihood_s']):>7} {r['requests_per_s']:>8.0f} "
              f"{r['tokens']:>11} {r['forward_calls']:>8} {fmt(m.get('acc'), '.4f'):>6} {fmt(m.get('acc_norm'), '.4f'):>8}")
        if r.get("_phase_line"):
            print(r["_phase_line"])
    print(f"anchors: lm-eval `mamba_ssm` wrapper on one H200; lm-eval `hf` mamba-130m whole process "
          f"{ANCHOR_HF_130M_WHOLE:.0f} s. Random weights: accuracies are at chance (~0.25).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("MAMBA_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data")),
                    help="offline data folder (hellaswag/ and tokenizers/gpt-neox-20b/)")
    ap.add_argument("--shapes", default="mamba-130m,mamba-2.8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--modes", default="shared", help="comma-separated: shared (share_context=true), unshared")
    ap.add_argument("--batch-size", default="256")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default=None, help="model_args backend (default: the device's default)")
    ap.add_argument("--batch-invariant", choices=["true", "false"], default=None,
                    help="model_args batch_invariant (default: --model mamba's, true)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (smoke tests)")
    ap.add_argument("--work-dir", default=None, help="checkpoints and outputs (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--invariance", type=int, default=0, metavar="N",
                    help="also check batch-size invariance on the first N HellaSwag documents (e.g. 200)")
    ap.add_argument("--verbose", action="store_true", help="show lm_eval's output")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each (shape, mode) this many times (the first compiles Triton kernels into an empty cache)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_eval.py: --device cuda needs a CUDA GPU (use --device cpu with --shapes tiny for a smoke test)",
              file=sys.stderr)
        return 2
    shapes, modes = args.shapes.split(","), args.modes.split(",")
    for name, allowed in ((s, SHAPES) for s in shapes):
        if name not in allowed:
            ap.error(f"unknown shape {name!r} (known: {', '.join(SHAPES)})")
    for mode in modes:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    data = Path(args.data_dir).expanduser().resolve()
    tokenizer = data / "tokenizers" / "gpt-neox-20b"
    if not (tokenizer / "tokenizer.json").is_file():
        print(f"bench_eval.py: no tokenizer at {tokenizer} (set --data-dir)", file=sys.stderr)
        return 2
    from mamba_eval.harness.offline import prepare_offline_tasks

    include = prepare_offline_tasks(data)
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_eval.")
        work = Path(tmp.name)
    info = {"torch": torch.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "batch_size": args.batch_size, "dtype": args.dtype, "limit": args.limit, "task": TASK}
    runs, invariance = [], []
    try:
        for shape in shapes:
            t0 = time.perf_counter()
            checkpoint = write_checkpoint(work / f"ckpt-{shape}", shape, args.device)
            print(f"{shape}: checkpoint ready in {time.perf_counter() - t0:.1f} s ({checkpoint})", flush=True)
            for mode in modes:
                for rep in range(args.repeat):
                    run = run_one(args, shape, mode, checkpoint, tokenizer, include, work)
                    run["repeat"] = rep
                    print(f"{shape}/{mode}: whole process {run['whole_process_s']:.1f} s, loglikelihood "
                          f"{run['loglikelihood_s']:.1f} s ({run['requests']} requests)", flush=True)
                    runs.append(run)
            if args.invariance:
                inv = check_invariance(args, shape, checkpoint, tokenizer, data, args.invariance)
                invariance.append(inv)
                same = [k for k, v in inv.items() if isinstance(v, dict) and v["bitwise_equal_to_bs1"]]
                differ = {k: v["max_abs_diff"] for k, v in inv.items() if isinstance(v, dict)
                          and not v["bitwise_equal_to_bs1"]}
                print(f"{shape}: batch-size invariance on {inv['requests']} requests: bit-for-bit equal to "
                      f"batch size 1: {', '.join(same)}; differing (max |diff|): {differ or 'none'}; "
                      f"shared vs unshared max |diff| {inv['shared_vs_unshared_max_abs_diff']:.2e}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(runs)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"info": info, "runs": runs, "invariance": invariance}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
