"""Host-side (Python/CPU) cost of the loglikelihood phase, with the device's work taken out.

The GPU runs HellaSwag's loglikelihood phase in a few seconds of kernels; everything else in that
phase is host work: tokenising, planning, building rows, uploads, the Python around each forward,
scoring bookkeeping, gathering the results. This script runs that host path alone, on the CPU:

- real requests: HellaSwag's validation documents as lm-eval builds them (the offline task
  mirror of ``mamba_eval.harness.offline``, ``Task.build_all_requests``, each request repeated as the
  evaluator repeats it), handed to ``MambaLM.loglikelihood`` as lm-eval's evaluator does;
- the real adapter and engine (tokenisation with the real GPT-NeoX-20B tokenizer, context
  sharing, budgets, padding, picks, scoring, results);
- a model of the chosen shape on PyTorch's ``meta`` device: every tensor operation is dispatched
  (shape inference, allocation bookkeeping) but computes nothing, so what is timed is what the
  host spends issuing work, as it would for an asynchronous GPU. The model's own layers are
  replaced by a stand-in that returns tensors of the right shapes (hidden states and, when
  asked, the per-layer recurrent states); the LM head (a meta matmul) is the real code. A read
  of device values by the host (``.item()``, ``.tolist()``, a Python ``if`` on a tensor) fails
  on ``meta``: the one read at the end (the scores) is answered with zeros and counted, so any
  other host-device synchronisation in the path shows up as an error.

Stages are timed exclusively (a stage's time excludes the stages it calls): tokenisation
(``BatchTokenizer.encode_pairs``), the engine's entry bookkeeping and planning, per-forward row
building and uploads, the model stand-in, scoring (LM head and picks), the final read and
gathering, and the rest. ``--profile N`` adds cProfile's N most expensive functions;
``--count-ops`` counts the tensor operations (kernel launches on a GPU) and host-to-device
copies issued outside the model.

    python scripts/bench_host.py                         # all 10,042 documents, mamba-130m shape
    python scripts/bench_host.py --limit 2000 --profile 25 --json bench_host.json
    python scripts/bench_host.py --share-context false   # lm-eval's one-sequence-per-request path
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pickle
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHAPES = ("mamba-130m", "mamba-2.8b", "mamba2-130m")  # mamba_eval.models.releases
TASK = "hellaswag"


def build_requests(data: Path, limit: int | None, cache: Path | None):
    """lm-eval's loglikelihood Instances for HellaSwag, in the evaluator's order and repeats."""
    if cache is not None and cache.is_file():
        return pickle.loads(cache.read_bytes())
    from lm_eval.tasks import TaskManager

    from mamba_eval.harness.offline import prepare_offline_tasks

    manager = TaskManager(include_path=str(prepare_offline_tasks(data)))
    task = manager.load([TASK])["tasks"][TASK]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = [req for req in task.instances for _ in range(req.repeats)]
    if cache is not None:
        cache.write_bytes(pickle.dumps(requests))
    return requests


def write_tiny_checkpoint(folder: Path) -> Path:
    """A 1-layer d_model=16 checkpoint (mamba_ssm format, real vocabulary rows) for MambaLM to load."""
    from mamba_eval.models.releases import release, write_random_checkpoint

    return write_random_checkpoint(folder, release("mamba-130m", d_model=16, n_layer=1))


class Stages:
    """Exclusive time per stage, wall and CPU (all threads of the process: the tokenizer's Rust
    threads count; on a shared machine CPU time is the steadier figure): a wrapped call's time
    minus that of the wrapped calls inside it."""

    def __init__(self):
        self.time: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []

    def wrap(self, owner, name: str, stage: str) -> bool:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            return False
        is_static = isinstance(original, staticmethod)
        func = original.__func__ if is_static else original

        def timed(*args, **kwargs):
            frame = [time.perf_counter(), time.process_time(), 0.0, 0.0]  # starts, nested stages' times
            self.stack.append(frame)
            try:
                return func(*args, **kwargs)
            finally:
                self.stack.pop()
                elapsed, cpu = time.perf_counter() - frame[0], time.process_time() - frame[1]
                self.time[stage] += elapsed - frame[2]
                self.cpu[stage] += cpu - frame[3]
                self.calls[stage] += 1
                if self.stack:
                    self.stack[-1][2] += elapsed
                    self.stack[-1][3] += cpu

        setattr(owner, name, staticmethod(timed) if is_static else timed)
        return True


def op_counter():
    """A dispatch mode counting the tensor operations the host issues on the meta device outside
    the model stand-in: on a GPU each is a kernel launch (views excepted), each host-to-device
    copy an upload."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.paused = False
            self.counts = {"ops": 0, "views": 0, "uploads": 0}
            self.by_op: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not self.paused:
                tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                out_meta = kwargs.get("device") == torch.device("meta")
                if out_meta or any(t.device.type == "meta" for t in tensors):
                    name = func.overloadpacket.__name__
                    if any(t.device.type == "cpu" for t in tensors):
                        self.counts["uploads"] += 1
                    elif func.is_view:
                        self.counts["views"] += 1
                    else:
                        self.counts["ops"] += 1
                        self.by_op[name] += 1
            return func(*args, **kwargs)

    return Counter()


def install_meta_model(lm, shape: str, reads: dict, counter=None):
    """Replace ``lm``'s model by one of ``shape`` on the meta device whose layers are a stand-in."""
    import torch

    from mamba_eval.harness.executor import Scores
    from mamba_eval.models.model import LanguageModel
    from mamba_eval.models.releases import release_config
    from mamba_eval.models.state import SSMState

    cfg = release_config(shape)
    meta = torch.device("meta")
    model = LanguageModel(cfg, backend="ref", device=meta, dtype=torch.bfloat16)
    mixers = [layer.mixer for layer in cfg.layers]

    def backbone_forward(input_ids, state=None, return_state=False, lengths=None):
        if counter is not None:
            counter.paused = True
        try:
            return stand_in(input_ids, state, return_state, lengths)
        finally:
            if counter is not None:
                counter.paused = False

    def stand_in(input_ids, state, return_state, lengths):
        if input_ids.device != meta or input_ids.dtype != torch.long or input_ids.ndim != 2:
            raise ValueError(f"stand-in forward: got {input_ids.dtype} {tuple(input_ids.shape)} on {input_ids.device}")
        b, length = input_ids.shape
        if lengths is not None and (not return_state or lengths.device != meta or lengths.dtype != torch.long
                                    or tuple(lengths.shape) != (b,)):
            raise ValueError(f"stand-in forward: bad lengths {lengths.dtype} {tuple(lengths.shape)} on "
                             f"{lengths.device} (return_state={return_state})")
        if state is not None:
            model._check_state(state, b)
        hidden = torch.empty(b, length, cfg.d_model, dtype=model.dtype, device=meta)
        states = None
        if return_state:
            states = [SSMState(torch.empty(b, m.conv_dim, m.d_conv - 1, dtype=model.dtype, device=meta),
                               torch.empty(b, *m.ssm_state_shape, dtype=torch.float32, device=meta))
                      for m in mixers]
        return hidden, states

    model.backbone_forward = backbone_forward
    lm.model = model
    lm._device = meta

    original_fetch = Scores.fetch

    def fetch(self):  # the one read of device values: zeros in their place, then the real code
        reads["final_reads"] += 1
        self.values = [torch.zeros(v.shape, dtype=v.dtype) for v in self.values]
        self.greedy = [torch.zeros(g.shape, dtype=g.dtype) for g in self.greedy]
        return original_fetch(self)

    Scores.fetch = fetch
    return model


def run(args) -> dict:
    t_start = time.perf_counter()
    import torch

    import mamba_eval.harness.lm as lm_mod
    from mamba_eval.harness import engine
    from mamba_eval.harness.engine import EngineStats
    from mamba_eval.harness.executor import Executor
    from mamba_eval.harness.tokenization import BatchTokenizer
    from mamba_eval.models.state import SSMState

    torch.set_num_threads(max(1, args.threads))
    data = Path(args.data_dir).expanduser().resolve()
    tokenizer = data / "tokenizers" / "gpt-neox-20b"
    cache = Path(args.requests_cache) if args.requests_cache else None
    t0 = time.perf_counter()
    requests = build_requests(data, args.limit, cache)
    t_requests = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench_host.") as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny")
        lm = lm_mod.MambaLM(pretrained=str(ckpt), tokenizer=str(tokenizer), dtype="float32", device="cpu",
                            batch_size=args.batch_size, share_context=args.share_context)
    reads = {"final_reads": 0}
    counter = op_counter() if args.count_ops else None
    install_meta_model(lm, args.shape, reads, counter)

    stages = Stages()
    wrapped = {
        "tokenisation": [(BatchTokenizer, "encode_pairs")],
        "model stand-in (device work)": [(lm.model, "backbone_forward")],
        "LM head + log-softmax (device work)": [(type(lm.model), "lm_logits")],
        "planning": [(engine, "plan_pairs")],
        "forward: rows, uploads, picks": [(Executor, "forward")],
        "scoring: picks, gathers": [(Executor, "score_rows")],
        "state forks": [(SSMState, "index_select")],
        "final read + gather": [(engine.PairScorer, "results")],
        "progress bar": [(lm_mod._ProgressBar, "__call__")],
        "engine: other": [(lm_mod, "score_continuations")],
        "adapter: other": [(lm_mod.MambaLM, "loglikelihood")],
    }
    active = [stage for stage, targets in wrapped.items() for owner, name in targets
              if owner is not None and stages.wrap(owner, name, stage)]
    stats: list[EngineStats] = []
    original_score = lm_mod.score_continuations

    def counted(*a, **k):
        stats.append(EngineStats())
        return original_score(*a, stats=stats[-1], **k)

    lm_mod.score_continuations = counted
    stages.wrap(lm_mod, "score_continuations", "engine: other")

    gc_time = {"s": 0.0, "collections": [0, 0, 0], "start": 0.0}

    def on_gc(phase, info):
        if phase == "start":
            gc_time["start"] = time.perf_counter()
        else:
            gc_time["s"] += time.perf_counter() - gc_time["start"]
            gc_time["collections"][info["generation"]] += 1

    gc.callbacks.append(on_gc)
    gc_objects = len(gc.get_objects())
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    if counter is not None:
        with counter:
            results = lm.loglikelihood(requests, disable_tqdm=not args.tqdm)
    else:
        results = lm.loglikelihood(requests, disable_tqdm=not args.tqdm)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler:
        profiler.disable()
    gc.callbacks.remove(on_gc)
    if len(results) != len(requests):
        raise RuntimeError(f"{len(results)} results for {len(requests)} requests")

    st = stats[-1]
    device_stages = {s for s in stages.time if "device work" in s}
    host = total - sum(stages.time[s] for s in device_stages)
    host_cpu = total_cpu - sum(stages.cpu[s] for s in device_stages)
    out = {
        "shape": args.shape, "limit": args.limit, "batch_size": args.batch_size, "share_context": args.share_context,
        "requests": len(requests), "threads": torch.get_num_threads(), "requests_build_s": t_requests,
        "loglikelihood_s": total, "loglikelihood_cpu_s": total_cpu, "host_s": host, "host_cpu_s": host_cpu,
        "host_us_per_request": 1e6 * host / max(1, len(requests)),
        "host_ms_per_forward": 1e3 * host / max(1, st.forward_calls),
        "stages": {s: {"s": stages.time.get(s, 0.0), "cpu_s": stages.cpu.get(s, 0.0), "calls": stages.calls.get(s, 0)}
                   for s in dict.fromkeys(active)},
        "gc_s": gc_time["s"], "gc_collections": gc_time["collections"], "gc_tracked_objects": gc_objects,
        "device_ops": None if counter is None else {
            **counter.counts, "per_forward": {k: v / max(1, st.forward_calls) for k, v in counter.counts.items()},
            "by_op": dict(sorted(counter.by_op.items(), key=lambda kv: -kv[1]))},
        "engine": st.__dict__, "final_reads": reads["final_reads"], "script_s": time.perf_counter() - t_start,
    }
    if profiler:
        rows = []
        ps = pstats.Stats(profiler)
        for (file, line, func), (cc, nc, tt, ct, _) in sorted(ps.stats.items(), key=lambda kv: -kv[1][2])[:args.profile]:
            rows.append({"function": f"{os.path.relpath(file, REPO) if file.startswith(str(REPO)) else file}:{line}({func})",
                         "calls": nc, "tottime_s": tt, "cumtime_s": ct})
        out["profile"] = rows
    return out


def print_table(r: dict) -> None:
    e = r["engine"]
    print(f"\nHost cost of the loglikelihood phase: {r['requests']} HellaSwag requests, {r['shape']} shape on the meta "
          f"device, batch_size={r['batch_size']}, share_context={r['share_context']}, {r['threads']} thread(s)")
    print(f"{'stage':<38} {'wall s':>8} {'cpu s':>8} {'calls':>8} {'share':>6}")
    for stage, v in r["stages"].items():
        print(f"{stage:<38} {v['s']:>8.3f} {v['cpu_s']:>8.3f} {v['calls']:>8} "
              f"{100 * v['s'] / r['loglikelihood_s']:>5.1f}%")
    print(f"{'total (loglikelihood call)':<38} {r['loglikelihood_s']:>8.3f} {r['loglikelihood_cpu_s']:>8.3f}")
    print(f"{'host (total minus device work)':<38} {r['host_s']:>8.3f} {r['host_cpu_s']:>8.3f}   = "
          f"{r['host_us_per_request']:.1f} us/request, {r['host_ms_per_forward']:.2f} ms/forward (wall)")
    print(f"engine: {e['forward_calls']} forwards, {e['tokens']} tokens ({e['padded_tokens']} with padding), "
          f"{e['unique']} distinct requests, {e['shared_contexts']} shared contexts, "
          f"{e['tokens'] / max(1, e['forward_calls']):.0f} tokens/forward; final reads {r['final_reads']}")
    ctx_tokens, ctx_padded = e["tokens"] - e["fork_tokens"], e["padded_tokens"] - e["fork_padded_tokens"]
    print(f"padding: context passes {ctx_tokens} tokens in {ctx_padded} positions "
          f"({100 * (1 - ctx_tokens / max(1, ctx_padded)):.1f}% padding), continuations from forked states "
          f"{e['fork_tokens']} in {e['fork_padded_tokens']} ({100 * (1 - e['fork_tokens'] / max(1, e['fork_padded_tokens'])):.1f}%)")
    if r.get("device_ops"):
        d = r["device_ops"]
        print(f"tensor operations issued outside the model (timings above include the counting): {d['ops']} "
              f"({d['per_forward']['ops']:.1f} per forward), plus {d['views']} views and {d['uploads']} host-to-device "
              f"copies ({d['per_forward']['uploads']:.1f} per forward); by operation: "
              + ", ".join(f"{k} {v}" for k, v in d["by_op"].items()))
    print(f"Python's cyclic garbage collector: {r['gc_s']:.3f} s inside the stages above, collections per "
          f"generation {r['gc_collections']}, {r['gc_tracked_objects']} tracked objects at the start")
    if r.get("profile"):
        print(f"\n{'tottime s':>9} {'cumtime s':>9} {'calls':>9}  function")
        for p in r["profile"]:
            print(f"{p['tottime_s']:>9.3f} {p['cumtime_s']:>9.3f} {p['calls']:>9}  {p['function']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("MAMBA_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--limit", type=int, default=None, help="HellaSwag documents (default: all 10,042)")
    ap.add_argument("--shape", default="mamba-130m", choices=sorted(SHAPES))
    ap.add_argument("--batch-size", default="256")
    ap.add_argument("--share-context", default="true", choices=["true", "false"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the host path is one thread)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also report cProfile's top N functions")
    ap.add_argument("--count-ops", action="store_true",
                    help="count the tensor operations and uploads issued outside the model (slows the run)")
    ap.add_argument("--requests-cache", help="pickle of the built requests (written if absent, read if present)")
    ap.add_argument("--no-tqdm", dest="tqdm", action="store_false",
                    help="hide the progress bar (lm-eval shows it; its updates are host work too)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not (Path(args.data_dir) / "hellaswag" / "hellaswag_val.jsonl").is_file():
        print(f"bench_host.py: no HellaSwag data under {args.data_dir} (set --data-dir)", file=sys.stderr)
        return 2
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
