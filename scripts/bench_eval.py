"""End-to-end evaluation speed: full HellaSwag validation through ``lm_eval --model mamba``.

The setup of the anchors' end-to-end table (reference/anchors.md): random-init checkpoints at the
published mamba-130m and mamba-2.8b shapes, written in mamba_ssm's format (``config.json`` +
fp32 ``pytorch_model.bin``), the real GPT-NeoX-20B tokenizer, bf16, ``--batch_size 256``, and
HellaSwag's 10,042 validation documents (40,168 loglikelihood requests) read from a local data
folder through ``mamba_eval.harness.offline.prepare_offline_tasks``. Each run is one fresh
``lm_eval`` process; the script reports

- whole process: the wall time of that process, start-up, model load and task building included;
- loglikelihood phase: the time spent inside ``MambaLM.loglikelihood`` (tokenising and scoring);

with the engine's counters (forwards, tokens run, shared contexts) and the accuracies, and writes
everything as JSON. When mamba_ssm imports (and ``--peer off`` is not given), lm-eval's own
``mamba_ssm`` wrapper runs the same task on the same checkpoint in the same run, timed the same way,
and the table shows its times and our speed over it. Without it, the figures stored in
``scripts/anchors.py`` are shown in columns of their own, with no ratio.

    python scripts/bench_eval.py --json bench_eval.json                       # GPU, both shapes
    python scripts/bench_eval.py --modes shared,unshared --shapes mamba-130m  # context sharing on/off
    python scripts/bench_eval.py --shapes tiny --device cpu --dtype float32 --limit 8 --batch-size 8  # smoke test

The hybrids in transformers' format (``--shapes bamba-9b,zamba2-2.7b``: transformers' default
configs, which are those releases' shapes; random init by transformers' own classes, written in
bf16 as safetensors) are measured against lm-eval's ``--model hf`` on the same checkpoint instead
(``--peer only`` runs the peer alone, so that each fits one command's time).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from bench_common import format_table, import_peer, run_info, write_json  # noqa: E402

from mamba_eval.models.releases import release, write_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Published Mamba-1 shapes (mamba_eval.models.releases), plus a tiny one for smoke tests on the CPU.
SHAPES = {
    "mamba-130m": release("mamba-130m"),
    "mamba-2.8b": release("mamba-2.8b"),
    "tiny": release("mamba-130m", d_model=64, n_layer=2),
}
# transformers-format hybrids: (transformers family, config fields over its defaults). Zamba2's
# vocabulary is widened to hold the GPT-NeoX tokenizer's ids.
HF_SHAPES = {
    "bamba-9b": ("Bamba", {}),
    "zamba2-2.7b": ("Zamba2", {"num_mem_blocks": 2, "vocab_size": 50280}),
    "tiny-bamba": ("Bamba", {"vocab_size": 50280, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "attn_layer_indices": [1],
                             "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 32}),
}
TASK = "hellaswag"
MODES = {"shared": "true", "unshared": "false"}


def write_hf_checkpoint(folder: Path, shape: str, device: str) -> Path:
    """A random-init checkpoint of a transformers-format hybrid, bf16 safetensors, drawn on the GPU
    when there is one (reused when already written)."""
    import torch
    import transformers

    family, fields = HF_SHAPES[shape]
    stamp = folder / "bench_shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == [family, fields]:
        return folder
    init_device = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    config = getattr(transformers, f"{family}Config")(**fields)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # drawn in bf16: a 9B model in fp32 would not fit beside it
    try:
        with torch.device(init_device):
            model = getattr(transformers, f"{family}ForCausalLM")(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    del model
    stamp.write_text(json.dumps([family, fields]))
    return folder


def write_checkpoint(folder: Path, shape: str, device: str) -> Path:
    """A random-init checkpoint of ``shape`` in mamba_ssm's format (reused when already written)."""
    import torch

    if shape in HF_SHAPES:
        return write_hf_checkpoint(folder, shape, device)
    config = SHAPES[shape]
    if (folder / "pytorch_model.bin").is_file() and (folder / "config.json").is_file() \
            and json.loads((folder / "config.json").read_text()) == config:
        return folder
    init_device = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return write_random_checkpoint(folder, config, seed=0, device=init_device)


def lm_eval_argv(args, checkpoint: Path, tokenizer: Path, include: Path, mode: str, out_dir: Path) -> list[str]:
    """``mode``: shared / unshared (our ``--model mamba``), or a peer: ``mamba_ssm`` (lm-eval's
    wrapper) or ``hf`` (lm-eval's transformers model)."""
    model_args = f"pretrained={checkpoint},tokenizer={tokenizer},dtype={args.dtype}"
    if mode in MODES:
        model_args += f",share_context={MODES[mode]}"
        if args.backend:
            model_args += f",backend={args.backend}"
        if args.batch_invariant is not None:
            model_args += f",batch_invariant={args.batch_invariant}"
    argv = ["lm_eval", "--model", "mamba" if mode in MODES else mode, "--model_args", model_args,
            "--tasks", TASK,
            "--include_path", str(include), "--batch_size", str(args.batch_size), "--device", args.device,
            "--output_path", str(out_dir)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    return argv


def child(spec_path: str) -> int:
    """One timed lm_eval process: time the model's loglikelihood and, for ours, collect the engine's counters."""
    t_child = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import mamba_eval.harness.lm as lm_mod
    from mamba_eval.harness.engine import EngineStats

    if spec["model"] == "mamba":
        model_cls = lm_mod.MambaLM
    elif spec["model"] == "hf":
        from lm_eval.models.huggingface import HFLM as model_cls
    else:
        from lm_eval.models.mamba_lm import MambaLMWrapper as model_cls
    timing = {"loglikelihood_s": 0.0, "loglikelihood_calls": 0}
    marks: dict[str, float] = {}
    original_init = model_cls.__init__

    def timed_init(self, *a, **k):
        marks.setdefault("init_start", time.perf_counter())
        try:
            return original_init(self, *a, **k)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["init_end"] = time.perf_counter()

    stats: list[EngineStats] = []
    original_ll, original_score = model_cls.loglikelihood, lm_mod.score_continuations

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

    model_cls.loglikelihood = timed_loglikelihood
    model_cls.__init__ = timed_init
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
    spec = {"model": "mamba" if mode in MODES else mode,
            "argv": lm_eval_argv(args, checkpoint, tokenizer, include, mode, out_dir),
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
    row = {"shape": shape, "mode": mode, "whole_process_s": whole, **result, "argv": spec["argv"]}
    if engine:  # our model's counters (lm-eval's wrapper has none)
        row.update({k: sum(e[k] for e in engine) for k in
                    ("requests", "unique", "shared_requests", "forward_calls", "tokens", "padded_tokens", "ooms")})
        row["requests_per_s"] = row["requests"] / max(result["loglikelihood_s"], 1e-9)
    return row


def add_peer(runs: list[dict], peer_runs: list[dict], gpu: str | None, tiny: bool) -> None:
    """Beside each of our runs: the peer's run of the same shape and repeat, measured in this run,
    with our speed over it; else the stored figures (no ratio)."""
    for r in runs:
        peer = next((p for p in peer_runs if p["shape"] == r["shape"] and p["repeat"] == r["repeat"]), None)
        if peer is not None:
            r.update(peer=peer["mode"], peer_acc=peer.get("metrics", {}).get("acc"),
                     peer_whole_process_s=peer["whole_process_s"], peer_loglikelihood_s=peer["loglikelihood_s"],
                     speed_vs_peer_whole=peer["whole_process_s"] / r["whole_process_s"],
                     speed_vs_peer_loglikelihood=peer["loglikelihood_s"] / r["loglikelihood_s"])
        elif not peer_runs and not tiny:
            found = anchors.stored("eval", r["shape"], gpu)
            if found:
                (r["stored_peer_whole_process_s"], r["stored_peer_loglikelihood_s"]), source = found
                r["stored_source"] = source.label


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


def print_table(runs: list[dict], peer_runs: list[dict]) -> None:
    def fmt(v, spec=".1f"):
        return None if v is None else format(v, spec)

    header = ["shape", "mode", "whole s", "ll s", "req/s", "tokens run", "forwards", "acc", "acc_norm"]
    header += (["peer", "peer whole s", "peer ll s", "peer acc", "speed vs peer (whole / ll)"] if peer_runs
               else ["stored mamba_ssm whole s", "stored mamba_ssm ll s"])
    rows, phases = [], []
    for r in runs:
        m = r.get("metrics", {})
        row = [r["shape"], r["mode"], fmt(r["whole_process_s"]), fmt(r["loglikelihood_s"]),
               fmt(r["requests_per_s"], ".0f"), r["tokens"], r["forward_calls"], fmt(m.get("acc"), ".4f"),
               fmt(m.get("acc_norm"), ".4f")]
        if peer_runs:
            row += [r.get("peer"), fmt(r.get("peer_whole_process_s")), fmt(r.get("peer_loglikelihood_s")),
                    fmt(r.get("peer_acc"), ".4f"),
                    None if "speed_vs_peer_whole" not in r else
                    f"{r['speed_vs_peer_whole']:.2f}x / {r['speed_vs_peer_loglikelihood']:.2f}x"]
        else:
            row += [fmt(r.get("stored_peer_whole_process_s")), fmt(r.get("stored_peer_loglikelihood_s"))]
        rows.append(row)
    for r in runs + peer_runs:
        p = r.get("phases")
        if p:
            start = r["whole_process_s"] - p["child_total_s"]
            phases.append(f"{r['shape']}/{r['mode']}: interpreter start {start:.1f} s, imports + task index "
                          f"{p['imports_and_task_index_s']:.1f} s, model load {p['model_load_s']:.1f} s, "
                          f"task building {p['task_building_s']:.1f} s, loglikelihood {p['loglikelihood_s']:.1f} s, "
                          f"metrics + output {p['metrics_and_output_s']:.1f} s")
    print("\n" + format_table(header, rows))
    print("where the time goes:\n  " + "\n  ".join(phases))
    for label in sorted({r["stored_source"] for r in runs if r.get("stored_source")}):
        print(label)
    print("Random weights: accuracies are at chance (~0.25).")


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
    ap.add_argument("--peer", choices=["auto", "off", "only"], default="auto",
                    help="auto: in the same run, lm-eval's mamba_ssm wrapper when mamba_ssm imports (Mamba shapes) "
                         "or lm-eval's hf model (transformers-format hybrids); only: the peer alone")
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
    for name in shapes:
        if name not in SHAPES and name not in HF_SHAPES:
            ap.error(f"unknown shape {name!r} (known: {', '.join([*SHAPES, *HF_SHAPES])})")
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
    mamba_ssm = None
    if args.peer != "off" and args.device.startswith("cuda") and any(s in SHAPES for s in shapes):
        mamba_ssm = import_peer("mamba_ssm")
    peer = f"lm-eval's mamba_ssm wrapper, mamba_ssm {mamba_ssm.__version__}" if mamba_ssm else None
    if args.peer != "off" and any(s in HF_SHAPES for s in shapes):
        import transformers

        peer = ", ".join(filter(None, [peer, f"lm-eval's hf model, transformers {transformers.__version__}"]))
    info = {**run_info(args.device), "device": args.device, "batch_size": args.batch_size, "dtype": args.dtype,
            "limit": args.limit, "task": TASK, "peer": peer}
    runs, peer_runs, invariance = [], [], []
    try:
        for shape in shapes:
            t0 = time.perf_counter()
            checkpoint = write_checkpoint(work / f"ckpt-{shape}", shape, args.device)
            print(f"{shape}: checkpoint ready in {time.perf_counter() - t0:.1f} s ({checkpoint})", flush=True)
            for mode in modes if args.peer != "only" else ():
                for rep in range(args.repeat):
                    run = run_one(args, shape, mode, checkpoint, tokenizer, include, work)
                    run["repeat"] = rep
                    print(f"{shape}/{mode}: whole process {run['whole_process_s']:.1f} s, loglikelihood "
                          f"{run['loglikelihood_s']:.1f} s ({run['requests']} requests)", flush=True)
                    runs.append(run)
            peer_mode = "hf" if shape in HF_SHAPES and args.peer != "off" else "mamba_ssm" if mamba_ssm else None
            for rep in range(args.repeat if peer_mode else 0):
                run = run_one(args, shape, peer_mode, checkpoint, tokenizer, include, work)
                run["repeat"] = rep
                print(f"{shape}/lm-eval {peer_mode}: whole process {run['whole_process_s']:.1f} s, loglikelihood "
                      f"{run['loglikelihood_s']:.1f} s", flush=True)
                peer_runs.append(run)
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
    add_peer(runs, peer_runs, info["gpu"], tiny="tiny" in shapes)
    print_table(runs, peer_runs)
    if args.json:
        write_json(args.json, {"info": info, "runs": runs, "peer_runs": peer_runs, "invariance": invariance})
    return 0


if __name__ == "__main__":
    sys.exit(main())
