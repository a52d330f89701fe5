"""Where one ``lm_eval --model mamba`` HellaSwag run spends its time, phase by phase.

Runs the same process as ``scripts/bench_eval.py`` (its child: ``lm_eval``'s command line on a
random-init checkpoint of a published shape, the real tokenizer, local task files), in this
process, with a thread that samples the main thread's Python stack every ``--interval`` seconds.
For each phase of ``bench_eval.py`` (imports and task index, model load, task building,
loglikelihood, metrics and output) it prints the innermost call 90% of the phase's samples are
inside, and the functions found most often below it (inclusive: anywhere on the stack;
innermost: the frame running), then the number of compiled variants of each
Triton kernel the run used. ``--torch-profile`` also runs the loglikelihood phase under
``torch.profiler`` and prints the GPU time per kernel (the phase itself is then slower).
``--harness-cache`` profiles the run as ``mamba-eval`` makes it, with lm-eval's task index and
prompt templates cached (``MAMBA_EVAL_HARNESS_CACHE=1``); without it, a plain ``lm_eval`` run.

    python scripts/prof_eval.py --shape mamba-130m --json prof.json        # GPU
    python scripts/prof_eval.py --shape tiny --device cpu --dtype float32 --limit 4   # smoke test

A sample is where the interpreter was, not what the GPU did: a phase bound by the GPU shows the
host waiting (in a kernel launch when the launch queue is full, or in a copy that waits).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench_eval  # noqa: E402  (the checkpoint, the lm_eval arguments and the timed child)

from mamba_eval.harness.registration import HARNESS_CACHE_ENV  # noqa: E402
from mamba_eval.utils import data_dir_from_env  # noqa: E402

PHASES = ["imports_and_task_index_s", "model_load_s", "task_building_s", "loglikelihood_s", "metrics_and_output_s"]
KERNEL_MODULES = ("matmul", "selective_scan", "conv1d", "norm", "ssd", "mamba1_step")


class Sampler:
    """Samples one thread's stack (file:function per frame, outermost first) at an interval."""

    def __init__(self, thread_id: int, interval: float, t0: float):
        self.thread_id, self.interval, self.t0 = thread_id, interval, t0
        self.samples: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prof-eval-sampler")

    def _run(self):
        while not self._stop.is_set():
            frame = sys._current_frames().get(self.thread_id)
            taken = time.perf_counter() - self.t0  # when the frame was seen, not when it was formatted
            if frame is not None:
                stack = [f"{'/'.join(fr.filename.split('/')[-2:])}:{fr.name}" for fr in traceback.extract_stack(frame)]
                self.samples.append((taken, stack))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


COMMON_SHARE = 0.9  # a frame on this share of a phase's samples is the call the phase runs in


def _depth(frame: str, stacks) -> int:
    """The frame's deepest position on the stacks that hold it."""
    return max(st.index(frame) for st in stacks if frame in st)


def phase_report(samples, phases: dict, start: float, top: int) -> list[dict]:
    """Per phase: its time, its sample count and the most frequent functions (share of samples)."""
    out, t = [], start
    for name in PHASES:
        lo, hi = t, t + phases[name]
        t = hi
        stacks = [st for ts, st in samples if lo <= ts < hi]
        # Frames on nearly every sample's stack (the call the phase runs in) are named once. Not
        # every one: a sample taken at a phase's edge can fall just outside its call.
        counts = collections.Counter(f for st in stacks for f in set(st))
        common = {f for f, c in counts.items() if c >= COMMON_SHARE * len(stacks)}
        within = max(common, key=lambda f: _depth(f, stacks), default=None)
        inclusive, leaf = collections.Counter(), collections.Counter()
        for st in stacks:
            inclusive.update(set(st) - common)
            leaf[st[-1]] += 1
        n = max(len(stacks), 1)
        out.append({"phase": name, "seconds": phases[name], "samples": len(stacks), "within": within,
                    "inclusive": [(f, c / n) for f, c in inclusive.most_common(top)],
                    "leaf": [(f, c / n) for f, c in leaf.most_common(top)]})
    return out


def triton_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel of ``mamba_eval.kernels`` in this process."""
    counts = {}
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"mamba_eval.kernels.{module_name}")
        except ImportError:
            continue
        for name in dir(module):
            caches = getattr(getattr(module, name), "device_caches", None)
            if isinstance(caches, dict):
                n = sum(len(v[0]) for v in caches.values() if isinstance(v, tuple) and v and isinstance(v[0], dict))
                if n:
                    counts[f"{module_name}.{name}"] = n
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mamba-130m", choices=list(bench_eval.SHAPES))
    ap.add_argument("--data-dir", default=str(data_dir_from_env() or REPO.parent / "shared" / "data"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", default="256")
    ap.add_argument("--limit", type=int, default=None, help="documents (smoke tests)")
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between samples")
    ap.add_argument("--top", type=int, default=15, help="functions listed per phase")
    ap.add_argument("--torch-profile", action="store_true", help="GPU time per kernel of the loglikelihood phase")
    ap.add_argument("--harness-cache", action="store_true",
                    help=f"cache lm-eval's task index and templates, as mamba-eval does (sets {HARNESS_CACHE_ENV}=1)")
    ap.add_argument("--json", help="write the report (and every sample) here")
    args = ap.parse_args()
    # Read by the start-up hook when lm-eval's task manager is first imported, inside the run below.
    os.environ[HARNESS_CACHE_ENV] = "1" if args.harness_cache else "0"
    data = Path(args.data_dir).expanduser().resolve()
    tokenizer = data / "tokenizers" / "gpt-neox-20b"
    if not (tokenizer / "tokenizer.json").is_file():
        ap.error(f"no tokenizer at {tokenizer} (set --data-dir or MAMBA_EVAL_DATA_DIR)")

    from mamba_eval.harness.offline import prepare_offline_tasks

    include = prepare_offline_tasks(data)
    with tempfile.TemporaryDirectory(prefix="prof_eval.") as work:
        work = Path(work)
        # Written on the CPU (so that the run below pays the device's start-up, as bench_eval's does).
        checkpoint = bench_eval.write_checkpoint(work / f"ckpt-{args.shape}", args.shape, "cpu")
        run_args = argparse.Namespace(dtype=args.dtype, backend=None, batch_invariant=None,
                                      batch_size=args.batch_size, device=args.device, limit=args.limit)
        spec = {"model": "mamba", "argv": bench_eval.lm_eval_argv(run_args, checkpoint, tokenizer, include, "shared", work / "out"),
                "out_dir": str(work / "out"), "result": str(work / "result.json")}
        (work / "spec.json").write_text(json.dumps(spec))
        torch_table = None
        if args.torch_profile:
            torch_table = _profile_loglikelihood()
        t0 = time.perf_counter()
        with Sampler(threading.get_ident(), args.interval, t0) as sampler:
            start = time.perf_counter() - t0
            status = bench_eval.child(str(work / "spec.json"))
        if status != 0:
            print(f"prof_eval.py: the lm_eval run failed (exit {status})", file=sys.stderr)
            return status
        result = json.loads(Path(spec["result"]).read_text())
    report = phase_report(sampler.samples, result["phases"], start, args.top)
    for ph in report:
        print(f"\n== {ph['phase']}: {ph['seconds']:.2f} s, {ph['samples']} samples, {COMMON_SHARE:.0%} of them within {ph['within']}")
        print("   inclusive (on the stack):")
        for f, share in ph["inclusive"]:
            print(f"   {100 * share:5.1f}%  {f}")
        print("   innermost:")
        for f, share in ph["leaf"]:
            print(f"   {100 * share:5.1f}%  {f}")
    variants = triton_variants()
    print("\ncompiled Triton variants:", ", ".join(f"{k} {v}" for k, v in sorted(variants.items())) or "none")
    if torch_table is not None and torch_table["rows"]:
        print(f"\nloglikelihood phase under torch.profiler: GPU kernel time {torch_table['total_s']:.2f} s")
        for name, seconds, calls in torch_table["rows"]:
            print(f"   {seconds:8.3f} s  {100 * seconds / torch_table['total_s']:5.1f}%  {calls:7d}  {name[:90]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": args.device,
                                               "harness_cache": args.harness_cache, "phases": result["phases"],
                                               "report": report, "triton_variants": variants,
                                               "torch_profile": torch_table, "samples": sampler.samples}))
    return 0


def _profile_loglikelihood() -> dict:
    """Wrap ``MambaLM.loglikelihood`` so that its run is profiled; returns the table it fills."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import mamba_eval.harness.lm as lm_mod

    table = {"total_s": 0.0, "rows": []}
    original = lm_mod.MambaLM.loglikelihood

    def profiled(self, requests, disable_tqdm: bool = False):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            out = original(self, requests, disable_tqdm=disable_tqdm)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        kernels = torch.autograd.DeviceType.CUDA  # kernel events (operator events repeat their time)
        events = [e for e in prof.key_averages()
                  if getattr(e, "device_type", None) == kernels and getattr(e, "self_device_time_total", 0) > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        table["total_s"] = sum(e.self_device_time_total for e in events) / 1e6
        table["rows"] = [(e.key, e.self_device_time_total / 1e6, e.count) for e in events[:25]]
        return out

    lm_mod.MambaLM.loglikelihood = profiled
    return table


if __name__ == "__main__":
    sys.exit(main())
