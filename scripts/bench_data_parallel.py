"""Data-parallel evaluation: the same ``lm_eval`` run with one process and with N, for ``--model
mamba`` and ``--model hf``, with the samples compared.

For each shape, a random-init checkpoint is written in mamba_ssm's format (read by ``mamba``) and
the same tensors in transformers' format (read by ``hf``). Each model then runs the tasks (default:
HellaSwag, LAMBADA and PIQA, whole validation sets, from a local data folder) in a fresh ``lm_eval``
process, once alone and once under a launcher with N processes: ``accelerate launch --multi_gpu``
on GPUs (one process per GPU, NCCL's NVLink multicast off), ``torchrun`` on CPUs. The script reports

- whole process: the wall time of each run, start-up, model load and task building included, and
  the speed-up of N processes over one;
- whether every per-sample response of the N-process run equals the one-process run as lm-eval's
  samples files hold them (bit for bit), and which ranks built requests (lm-eval logs them), so a
  launch that silently ran N copies of the whole job is caught;
- the accuracies of each run, and ours beside ``hf``'s.

    python scripts/bench_data_parallel.py --json dp.json                      # every GPU of the machine
    python scripts/bench_data_parallel.py --shapes tiny --device cpu --dtype float32 --models mamba \\
        --processes 2 --tasks hellaswag --limit 8 --batch-size 4             # smoke test on the CPUs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import format_table, run_info, write_json  # noqa: E402
from bench_eval import SHAPES, write_checkpoint  # noqa: E402
from bench_gen_task import write_hf_copy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = ("mamba", "hf")
DEFAULT_TASKS = "hellaswag,lambada_openai,piqa"


def launcher(processes: int, device: str, port: int) -> list[str]:
    """The command prefix that starts ``processes`` copies of a Python module (none for one)."""
    if processes == 1:
        return [sys.executable]
    if device.startswith("cuda"):
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def lm_eval_argv(args, model: str, checkpoint: Path, tokenizer: Path, include: Path, out_dir: Path) -> list[str]:
    model_args = f"pretrained={checkpoint},tokenizer={tokenizer},dtype={args.dtype}"
    argv = ["-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", args.tasks,
            "--include_path", str(include), "--batch_size", str(args.batch_size), "--device", args.device,
            "--output_path", str(out_dir), "--log_samples"]
    return argv + (["--limit", str(args.limit)] if args.limit is not None else [])


def _text(value):
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return str(value)


def read_run(out_dir: Path) -> tuple[dict, dict]:
    """(task -> metrics, (task, doc_id) -> responses as text) of the run written under ``out_dir``."""
    results = sorted(glob.glob(str(out_dir / "*" / "results_*.json")))
    if len(results) != 1:
        raise RuntimeError(f"expected one results file under {out_dir}, found {len(results)}")
    metrics = {task: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, (int, float)) and "stderr" not in k}
               for task, m in json.loads(Path(results[0]).read_text())["results"].items()}
    samples = {}
    for path in glob.glob(str(out_dir / "*" / "samples_*.jsonl")):
        task = re.match(r"samples_(.+)_\d{4}-\d{2}-\d{2}T", Path(path).name).group(1)
        for line in open(path):
            row = json.loads(line)
            samples[(task, row["doc_id"])] = _text(row["resps"])
    return metrics, samples


def run_one(args, shape: str, model: str, processes: int, checkpoint: Path, tokenizer: Path, include: Path,
            work: Path) -> dict:
    out_dir = work / f"out-{shape}-{model}-{processes}"
    command = launcher(processes, args.device, 29600 + processes) + lm_eval_argv(args, model, checkpoint, tokenizer,
                                                                               include, out_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "NCCL_NVLS_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false"}
    if not args.device.startswith("cuda"):
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shape}/{model} with {processes} process(es) failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    metrics, samples = read_run(out_dir)
    ranks = sorted({int(r) for r in re.findall(r"Building contexts for \S+ on rank (\d+)", proc.stdout + proc.stderr)})
    return {"shape": shape, "model": model, "processes": processes, "whole_process_s": whole, "metrics": metrics,
            "ranks_building_requests": ranks, "samples": samples, "command": " ".join(command[1:])}


def compare(one: dict, many: dict) -> dict:
    """How the N-process run's samples compare with the one-process run's."""
    a, b = one["samples"], many["samples"]
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return {"samples": len(a), "differing_samples": len(differing), "identical": not differing and len(a) > 0,
            "first_differing": [list(k) for k in differing[:5]],
            "speedup": one["whole_process_s"] / many["whole_process_s"]}


def default_processes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.device_count()
    return 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mamba-130m,mamba-2.8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of mamba, hf")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--processes", type=int, default=None, help="N (default: every GPU; 2 on the CPU)")
    ap.add_argument("--data-dir", default=os.environ.get("MAMBA_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", default="256")
    ap.add_argument("--limit", type=int, default=None, help="documents per task")
    ap.add_argument("--work-dir", default=None, help="where checkpoints and outputs go (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    data = Path(args.data_dir).expanduser().resolve()
    tokenizer = data / "tokenizers" / "gpt-neox-20b"
    if not (tokenizer / "tokenizer.json").is_file():
        ap.error(f"no tokenizer at {tokenizer} (set --data-dir or MAMBA_EVAL_DATA_DIR)")
    shapes = [s for s in args.shapes.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(shapes) - set(SHAPES)) + sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown shape or model: {', '.join(unknown)}")
    processes = args.processes or default_processes(args.device)
    if processes < 2:
        print(f"bench_data_parallel.py: needs at least 2 processes; {args.device} gives {processes}", file=sys.stderr)
        return 2
    from mamba_eval.harness.offline import prepare_offline_tasks

    include = prepare_offline_tasks(data)
    info = {**run_info(args.device), "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
            "tasks": args.tasks, "processes": processes, "limit": args.limit}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_parallel.") as tmp:
        work = Path(args.work_dir or tmp)
        for shape in shapes:
            ckpt = write_checkpoint(work / shape, shape, args.device)
            folders = {"mamba": ckpt, "hf": write_hf_copy(ckpt, work / f"{shape}-hf") if "hf" in models else None}
            for model in models:
                one, many = (run_one(args, shape, model, n, folders[model], tokenizer, include, work)
                             for n in (1, processes))
                row = {"shape": shape, "model": model, "processes": processes,
                       "one_process_s": one["whole_process_s"], "n_processes_s": many["whole_process_s"],
                       "ranks_building_requests": many["ranks_building_requests"], **compare(one, many),
                       "metrics_one": one["metrics"], "metrics_n": many["metrics"], "command": many["command"]}
                rows.append(row)
                print(f"{shape} {model}: 1 process {row['one_process_s']:.1f} s, {processes} processes "
                      f"{row['n_processes_s']:.1f} s, identical samples: {row['identical']}", flush=True)
    header = ["shape", "model", "1 process s", f"{processes} processes s", "speed-up", "ranks", "samples",
              "identical", "accuracies (N processes)"]
    lines = []
    for r in rows:
        accs = ", ".join(f"{t} {m['acc']:.4f}" for t, m in sorted(r["metrics_n"].items()) if "acc" in m)
        lines.append([r["shape"], r["model"], f"{r['one_process_s']:.1f}", f"{r['n_processes_s']:.1f}",
                      f"{r['speedup']:.2f}x", ",".join(map(str, r["ranks_building_requests"])), r["samples"],
                      "yes" if r["identical"] else f"NO ({r['differing_samples']})", accs])
    print("\n" + format_table(header, lines) + "\n(whole-process wall time; samples compared bit for bit)")
    if args.json:
        write_json(args.json, {**info, "rows": rows})
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
