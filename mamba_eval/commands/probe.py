"""``mamba-eval probe``: long-context probes over context lengths, with a report.

    mamba-eval probe [--family mqar|passkey|passkey_gen|ppl] [--model_args pretrained=...]
                     [--lengths 1k,4k,16k] [--depths 0,0.5,1] [--pairs 4,8,16] [--samples N]
                     [--text FILE] [--data-dir DIR] [--device cuda] [--batch_size 1] [--out DIR]

For every length (and, for MQAR, every number of pairs) it runs one lm-eval task of
``mamba_eval.harness.probe_data`` through lm-eval's own ``simple_evaluate`` on one model instance,
and records the metrics, the documents' measured token counts, the time spent building the
data and evaluating, and the peak memory of the evaluation: ``torch.cuda.max_memory_allocated``
on a GPU; on the CPU the process's resident set size, sampled every 10 ms (labelled as such).
Then it writes into ``--out`` (each file atomically, also after every length, so an interrupted
run keeps what it measured):

- ``report.md``: accuracy (or loss) vs length tables, peak memory and time per length, plots;
- ``results.json`` (everything) and ``results.csv`` (one row per task and metric);
- ``tasks/``: the task configs used (``lm_eval --include_path OUT/tasks`` reruns any of them);
- ``lm_eval/<task>.json``: lm-eval's own output per task;
- ``accuracy_vs_length.png`` (or ``loss_vs_position.png``) and ``memory_time_vs_length.png``.

Without ``--model_args`` the MQAR family runs on the probe model (``mamba_eval.commands.probe_model``),
trained on first use into a cache folder. ``max_length`` is set from the longest length unless
given; for ``--model mamba``, ``batch_invariant`` defaults to false (see ``run_probe``). An out-of-memory error at one length is recorded as that length's result and the run
goes on. Bad input raises :class:`~mamba_eval.errors.MambaEvalError`.

This module's top level imports only the standard library (the CLI starts fast).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["DEFAULT_LENGTHS", "ProbeSpec", "add_subcommand", "run_probe"]

PROG = "mamba-eval probe"
FAMILY_NAMES = ("mqar", "passkey", "passkey_gen", "ppl")

#: Default lengths per family (tokens), chosen to run on a CPU in minutes for the small models.
DEFAULT_LENGTHS = {
    "mqar": "256,512,1k,2k,4k,16k",
    "passkey": "1k,4k,16k",
    "passkey_gen": "1k,4k,16k",
    "ppl": "4k,16k",
}
DEFAULT_PAIRS = "4,8,16"
#: The probe model's training pair counts: its default MQAR grid.
PROBE_MODEL_PAIRS = "2,4,8"
RESULTS_FORMAT = 1


class ProbeSpec:
    """A validated probe request (no heavy imports): family, lengths, the task grid."""

    def __init__(self, family: str, lengths: str | Sequence[int] | None = None, *, depths=None,
                 pairs=None, samples: int | None = None, seed: int | None = None,
                 text: str | None = None, data_dir: str | None = None):
        from mamba_eval.harness import probe_data as pd
        from mamba_eval.errors import MambaEvalError

        if family not in FAMILY_NAMES:
            raise MambaEvalError(f"unknown probe family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
        self.family = family
        if lengths is None:
            lengths = DEFAULT_LENGTHS[family]
        self.lengths = pd.parse_lengths(lengths) if isinstance(lengths, str) else [pd.parse_length(n) for n in lengths]
        passkey = family in ("passkey", "passkey_gen")
        if depths is not None and not passkey:
            raise MambaEvalError(f"--depths applies to the passkey families, not {family}")
        self.depths = pd._parse_depths(depths if depths is not None else pd.PASSKEY_DEPTHS) if passkey else None
        if pairs is not None and family != "mqar":
            raise MambaEvalError(f"--pairs applies to the mqar family, not {family}")
        self.pairs = _parse_ints("--pairs", pairs if pairs is not None else DEFAULT_PAIRS) if family == "mqar" else [None]
        if samples is not None and int(samples) < 1:
            raise MambaEvalError(f"--samples {samples}: must be at least 1")
        self.samples = None if samples is None else int(samples)
        self.seed = pd.DEFAULT_SEED if seed is None else int(seed)
        if (text or data_dir) and family != "ppl":
            raise MambaEvalError(f"--text and --data-dir apply to the ppl family, not {family}")
        self.text = str(Path(text).expanduser().resolve()) if text else None
        self.data_dir = str(Path(data_dir).expanduser().resolve()) if data_dir else None
        if family == "ppl":
            # Read it now: a missing or unreadable file fails before any model is loaded.
            pd.read_text(self.text, self.data_dir or os.environ.get("MAMBA_EVAL_DATA_DIR") or None)
        if family == "mqar":
            for length in self.lengths:
                for p in self.pairs:
                    if 4 * p + 1 > length:
                        raise MambaEvalError(f"MQAR length {length} is too short for {p} pairs (needs more than {4 * p})")

    def tasks(self) -> list[dict]:
        """One entry per task: name, length, pairs, config (dict)."""
        from mamba_eval.harness import probe_data as pd

        out = []
        for length in self.lengths:
            for pairs in self.pairs:
                cfg = pd.task_config(
                    self.family, length, pairs=pairs, samples=self.samples, seed=self.seed,
                    depths=self.depths or pd.PASSKEY_DEPTHS, text_file=self.text, data_dir=self.data_dir,
                )
                out.append({"task": cfg["task"], "length": length, "pairs": pairs, "config": cfg})
        return out


def _parse_ints(flag: str, value) -> list[int]:
    from mamba_eval.errors import MambaEvalError

    parts = [p.strip() for p in str(value).split(",") if p.strip()] if isinstance(value, str) else list(value)
    try:
        numbers = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise MambaEvalError(f"{flag} {value!r}: expected comma-separated integers") from None
    if not numbers or any(n < 1 for n in numbers) or len(set(numbers)) != len(numbers):
        raise MambaEvalError(f"{flag} {value!r}: expected distinct positive integers")
    return numbers


# ------------------------------------------------------------------------------ memory


class _PeakMemory:
    """Peak memory during a block: CUDA allocator peak on a GPU; else sampled process RSS."""

    def __init__(self, device_type: str, interval: float = 0.01):
        self.device_type = device_type
        self.interval = interval
        self.peak = 0
        self._stop = None
        self._thread = None

    @property
    def kind(self) -> str:
        if self.device_type == "cuda":
            return "cuda max_memory_allocated"
        return "process RSS, sampled every 10 ms" if _rss_bytes() is not None else "n/a"

    def __enter__(self) -> _PeakMemory:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif _rss_bytes() is not None:
            import threading

            self.peak = _rss_bytes() or 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss

    def __exit__(self, *exc) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
            self.reserved = int(torch.cuda.max_memory_reserved())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)

    def as_dict(self) -> dict:
        out = {"kind": self.kind, "peak_bytes": self.peak if self.kind != "n/a" else None}
        if self.device_type == "cuda":
            out["reserved_bytes"] = getattr(self, "reserved", None)
        return out


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# ------------------------------------------------------------------------------ files


def _write_atomic(path: Path, data: str | bytes) -> None:
    from mamba_eval.utils import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _json_text(obj) -> str:
    def default(o):
        try:
            return str(o)
        except Exception:  # pragma: no cover
            return repr(o)

    return json.dumps(obj, indent=2, default=default, allow_nan=True) + "\n"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


# ------------------------------------------------------------------------------ running


def _model_args_dict(model_args) -> dict:
    if model_args is None:
        return {}
    if isinstance(model_args, dict):
        return dict(model_args)
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(str(model_args))


def _metrics_of(result: dict, task: str) -> dict[str, Any]:
    """``{"acc": 0.9, "acc_stderr": 0.03, ...}`` from lm-eval's results of one task (filter "none")."""
    raw = result.get("results", {}).get(task, {})
    metrics = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        name, filt = key.split(",", 1)
        if filt == "none":
            metrics[name] = value
    return metrics


def _doc_stats(task_obj, family: str) -> dict:
    docs = task_obj.test_docs()
    if family == "ppl":
        tokens = [int(d["bucket_end"]) - int(d["bucket_start"]) for d in docs]
        windows = {int(d["window"]) for d in docs}
        return {"n_docs": len(docs), "windows": len(windows), "scored_tokens": sum(tokens),
                "context_tokens_total": sum(int(d["bucket_end"]) for d in docs)}
    counts = [int(d["context_tokens"]) for d in docs]
    return {"n_docs": len(docs), "context_tokens_min": min(counts), "context_tokens_max": max(counts),
            "context_tokens_total": sum(counts)}


def run_probe(
    family: str = "mqar",
    *,
    model: str = "mamba",
    model_args: str | dict | None = None,
    lengths: str | Sequence[int] | None = None,
    depths=None,
    pairs=None,
    samples: int | None = None,
    seed: int | None = None,
    text: str | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    batch_size: str | int | None = None,
    out: str | os.PathLike = "runs/probe",
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run a probe family over lengths and write the report into ``out``; returns the results
    (what ``results.json`` holds). Arguments as the command's flags (module docstring)."""
    from mamba_eval.errors import MambaEvalError

    log = log or (lambda msg: print(f"{PROG}: {msg}", file=sys.stderr, flush=True))
    args = _model_args_dict(model_args)
    default_model = not args.get("pretrained")
    if default_model and family == "mqar" and pairs is None:
        pairs = PROBE_MODEL_PAIRS
    spec = ProbeSpec(family, lengths, depths=depths, pairs=pairs, samples=samples, seed=seed,
                     text=text, data_dir=data_dir)
    trained = None
    if default_model:
        if model != "mamba" or family != "mqar":
            raise MambaEvalError(
                f"give --model_args pretrained=... for the {family} family (the offline default model, "
                f"trained on MQAR's word vocabulary, runs the mqar family only)"
            )
        from mamba_eval.commands.probe_model import default_probe_model

        args["pretrained"] = str(default_probe_model(log=log))
        trained = json.loads((Path(args["pretrained"]) / "probe_model.json").read_text())
    for key, value in (("device", device), ("batch_size", batch_size)):
        if value is not None:
            if key in args and str(args[key]) != str(value):
                raise MambaEvalError(f"--{key} {value} contradicts model_args {key}={args[key]}")
            args[key] = value
    if "batch_size" not in args:
        # One sequence at a time on a GPU, so the memory figures are those of one sequence; the
        # CPU's budget (a share of free memory) keeps its many small forwards fast.
        import torch

        wanted = str(args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        args["batch_size"] = 1 if wanted.startswith("cuda") else "auto"
    if model == "mamba":
        # The CPU's batch-invariance filler gives a lone long context up to 64 x threads rows
        # (mamba_eval.harness.engine.forward_shape): 10x the memory and 17x the time at 16K tokens on
        # 2 threads. A probe compares lengths, not batch sizes; batch_invariant=true keeps it.
        args.setdefault("batch_invariant", False)
    from mamba_eval.harness import probe_data as pd

    needed = pd.required_max_length(spec.lengths)
    if "max_length" not in args:
        args["max_length"] = needed

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tasks = spec.tasks()
    task_dir = pd.write_task_configs(
        out / "tasks", {f"{t['task']}.yaml": pd.render_yaml(t["config"], pd._HEADER) for t in tasks}
    )

    import lm_eval
    import torch
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = get_model(model).create_from_arg_obj(args)
    load_seconds = time.perf_counter() - start
    lm_device = getattr(lm, "device", None) or getattr(lm, "_device", None) or args.get("device") or "cpu"
    device_type = torch.device(str(lm_device)).type
    # Tasks get the model_args as metadata (the tokenizer and max_length they check against).
    # Only the run's own configs: no index of lm-eval's thousands of stock tasks (nor of the
    # shipped probes the start-up hook adds beside them).
    manager = TaskManager(include_path=str(task_dir.resolve()), include_defaults=False, metadata=dict(args))

    import datetime as _dt

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "family": family,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "model_args": {k: v for k, v in args.items()},
        "model_load_seconds": round(load_seconds, 2),
        "trained_probe_model": trained,
        "device": str(lm_device),
        "environment": _environment(torch, lm_eval, device_type),
        "spec": {"lengths": spec.lengths, "pairs": spec.pairs, "depths": spec.depths,
                 "samples": spec.samples, "seed": spec.seed, "text": spec.text, "data_dir": spec.data_dir},
        "data_version": pd.PROBE_DATA_VERSION,
        "tasks": [],
    }
    for entry in tasks:
        name = entry["task"]
        log(f"{name}: building data")
        record: dict[str, Any] = {"task": name, "length": entry["length"], "pairs": entry["pairs"],
                                  "length_name": pd.length_name(entry["length"])}
        t0 = time.perf_counter()
        task_obj = manager.load([name])["tasks"][name]
        record["data_seconds"] = round(time.perf_counter() - t0, 2)
        record.update(_doc_stats(task_obj, family))
        log(f"{name}: evaluating {record['n_docs']} documents")
        import gc

        gc.collect()
        if device_type == "cuda":
            torch.cuda.empty_cache()
        peak = _PeakMemory(device_type)
        t1 = time.perf_counter()
        try:
            with peak:
                result = lm_eval.simple_evaluate(
                    model=lm, tasks=[task_obj], task_manager=manager, bootstrap_iters=1000,
                    log_samples=False, verbosity=None,
                )
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not (isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()):
                raise
            record.update(status="out of memory", error=str(err).splitlines()[0][:300])
            log(f"{name}: out of memory")
        else:
            record["status"] = "ok"
            record["metrics"] = _metrics_of(result, name)
            keep = {k: v for k, v in result.items() if k != "samples"}
            _write_atomic(out / "lm_eval" / f"{name}.json", _json_text(keep))
        record["eval_seconds"] = round(time.perf_counter() - t1, 2)
        record["tokens_per_second"] = (
            round(record["context_tokens_total"] / record["eval_seconds"]) if record["eval_seconds"] > 0 else None
        )
        record["peak_memory"] = peak.as_dict()
        results["tasks"].append(record)
        log(f"{name}: {record['status']}, {record['eval_seconds']} s, peak {_gib(record['peak_memory']['peak_bytes'])}")
        _write_outputs(out, results, plots=False)
    _write_outputs(out, results, plots=plots)
    return results


def _environment(torch, lm_eval, device_type: str) -> dict:
    import platform

    from mamba_eval import __version__

    env = {
        "mamba_eval": __version__, "lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device_type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return env


# ------------------------------------------------------------------------------ report


def _main_metric(family: str) -> str:
    return {"passkey": "acc", "passkey_gen": "exact_match", "mqar": "acc", "ppl": "loss"}[family]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3f}"
    return str(value)


def _ok(tasks: list[dict]) -> list[dict]:
    return [t for t in tasks if t.get("status") == "ok"]


def _result_table(results: dict) -> list[str]:
    """The accuracy-vs-length (or loss-vs-position) table, as markdown lines."""
    family, tasks = results["family"], results["tasks"]
    metric = _main_metric(family)
    lines = []
    if family == "mqar":
        pairs = sorted({t["pairs"] for t in tasks})
        lines.append("| length | " + " | ".join(f"acc, {p} pairs" for p in pairs) + " |")
        lines.append("|---|" + "---|" * len(pairs))
        for length in sorted({t["length"] for t in tasks}):
            row = []
            for p in pairs:
                t = next((t for t in tasks if t["length"] == length and t["pairs"] == p), None)
                row.append(_cell(t, metric))
            lines.append(f"| {_length_label(length)} | " + " | ".join(row) + " |")
        lines.append("")
        lines.append("Chance for a model that only knows the answer is one of the values seen: about 1/pairs "
                     "(" + ", ".join(f"{1 / p:.3f}" for p in pairs) + ").")
    elif family in ("passkey", "passkey_gen"):
        depths = results["spec"]["depths"] or []
        from mamba_eval.harness.probe_data import depth_label

        cols = [(metric, "all depths")] + [(f"{metric}_depth_{depth_label(d)}", f"depth {d:g}") for d in depths]
        lines.append("| length | " + " | ".join(label for _, label in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for t in tasks:
            lines.append(f"| {_length_label(t['length'])} | " + " | ".join(_cell(t, m) for m, _ in cols) + " |")
        if family == "passkey":
            from mamba_eval.harness.probe_data import PASSKEY_CANDIDATES

            lines.append("")
            lines.append("Metric: the key has the highest log-likelihood among the candidates "
                         f"(chance 1/{PASSKEY_CANDIDATES}).")
        else:
            lines.append("")
            lines.append("Metric: greedy generation's leading digits equal the key.")
    else:  # ppl
        buckets = []
        for t in tasks:
            for m in (t.get("metrics") or {}):
                if m.startswith("loss_") and not m.endswith("_stderr") and m not in buckets:
                    buckets.append(m)
        buckets.sort(key=_bucket_start)
        lines.append("| window | loss (all) | " + " | ".join(b[len("loss_"):] for b in buckets) + " |")
        lines.append("|---|---|" + "---|" * len(buckets))
        for t in tasks:
            lines.append(f"| {_length_label(t['length'])} | {_cell(t, 'loss')} | "
                         + " | ".join(_cell(t, b) for b in buckets) + " |")
        lines.append("")
        lines.append("Loss in nats per token (token-weighted over windows) of the tokens at those positions "
                     "from the window start, each conditioned on the whole window before it.")
    return lines


def _bucket_start(metric: str) -> int:
    from mamba_eval.harness.probe_data import parse_length

    lo = metric[len("loss_"):].split("-")[0]
    return parse_length(lo) if lo != "0" else 0


def _cell(task: dict | None, metric: str) -> str:
    if task is None:
        return "-"
    if task.get("status") != "ok":
        return task.get("status", "-")
    value = (task.get("metrics") or {}).get(metric)
    return _fmt(value)


def _length_label(length: int) -> str:
    from mamba_eval.harness.probe_data import length_name

    name = length_name(length)
    return name if name == str(length) else f"{name} ({length})"


def _resource_table(results: dict) -> list[str]:
    tasks = results["tasks"]
    kind = next((t["peak_memory"]["kind"] for t in tasks), "n/a")
    lines = [
        f"| task | length | docs | context tokens | peak memory ({kind}) | data s | eval s | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        if "context_tokens_min" in t:
            tokens = (f"{t['context_tokens_min']}" if t["context_tokens_min"] == t["context_tokens_max"]
                      else f"{t['context_tokens_min']}-{t['context_tokens_max']}")
        else:
            tokens = f"{t.get('scored_tokens', '-')} scored"
        lines.append(
            f"| {t['task']} | {_length_label(t['length'])} | {t['n_docs']} | {tokens} | "
            f"{_gib(t['peak_memory']['peak_bytes'])} | {t['data_seconds']} | {t['eval_seconds']} | "
            f"{t.get('tokens_per_second') or '-'} |"
        )
    return lines


def _report(results: dict, plot_files: list[str]) -> str:
    family = results["family"]
    title = {"mqar": "Multi-query associative recall", "passkey": "Passkey retrieval (likelihood)",
             "passkey_gen": "Passkey retrieval (generation)", "ppl": "Perplexity by position"}[family]
    env = results["environment"]
    lines = [
        f"# {title} vs context length",
        "",
        f"Model `{results['model']}` with model_args `{_args_string(results['model_args'])}` on "
        f"{results['device']} ({env.get('gpu') or str(env.get('cpus')) + ' CPUs, ' + str(env.get('torch_threads')) + ' torch threads'}); "
        f"created {results['created']}; mamba-eval {env['mamba_eval']}, lm-eval {env['lm_eval']}, torch {env['torch']}; "
        f"probe data version {results['data_version']}, seed {results['spec']['seed']}.",
        "",
    ]
    trained = results.get("trained_probe_model")
    if trained:
        acc = trained.get("heldout_accuracy_at_train_length", {})
        lines += [
            f"The model is the offline probe model (`mamba_eval.commands.probe_model`, training version "
            f"{trained.get('train_version')}): trained on MQAR at {trained['config']['length']} tokens with "
            f"1-{trained['config']['max_pairs']} pairs, {trained['config']['steps']} steps in "
            f"{trained['train_seconds']} s; held-out accuracy at the training length: "
            + ", ".join(f"{v:.3f} ({p} pairs)" for p, v in acc.items()) + ".",
            "",
        ]
    if results.get("status") == "running" or len(results["tasks"]) < _expected_tasks(results):
        lines += [f"*Partial: {len(results['tasks'])} of {_expected_tasks(results)} tasks done.*", ""]
    lines += ["## Results", ""] + _result_table(results) + [""]
    lines += ["## Peak memory and time per length", ""] + _resource_table(results) + [""]
    lines += [
        "Peak memory is that of the evaluation of each task alone (on a GPU the allocator's peak "
        "after a reset, weights included; on the CPU the whole process's resident set, sampled). "
        "`data s` is lm-eval building the task (documents generated and tokenised); `eval s` is "
        "`simple_evaluate` (requests, tokenisation, scoring); tokens/s counts context tokens.",
        "",
    ]
    if str(results["model_args"].get("batch_size")) != "1":
        lines += [
            f"With batch_size={results['model_args'].get('batch_size')} several sequences share a forward, so "
            "the memory figures follow the batch budget, not one sequence; `--batch_size 1` measures one "
            "sequence at a time.",
            "",
        ]
    for f in plot_files:
        lines += [f"![{f}]({f})", ""]
    # lm_eval passes --device and --batch_size to the model itself; model_args must not repeat them.
    lm_eval_args = {k: v for k, v in results["model_args"].items() if k not in ("device", "batch_size")}
    lines += [
        "## Reproduce one task with plain lm-eval",
        "",
        "```sh",
        f"lm_eval --model {results['model']} --model_args {_args_string(lm_eval_args)} "
        f"--device {results['model_args'].get('device') or results['device']} "
        f"--batch_size {results['model_args'].get('batch_size', 1)} "
        f"--include_path tasks --tasks {results['tasks'][0]['task'] if results['tasks'] else '<task>'}",
        "```",
        "",
        "(run in this folder: `tasks/` holds the configs of this run, `lm_eval/<task>.json` lm-eval's own "
        "output per task.)",
        "",
    ]
    return "\n".join(lines)


def _expected_tasks(results: dict) -> int:
    spec = results["spec"]
    return len(spec["lengths"]) * len(spec["pairs"] or [None])


def _args_string(args: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def _csv(results: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["family", "task", "length", "pairs", "metric", "value", "status", "n_docs",
                     "peak_memory_bytes", "peak_memory_kind", "data_seconds", "eval_seconds"])
    for t in results["tasks"]:
        base = [results["family"], t["task"], t["length"], t["pairs"] if t["pairs"] is not None else ""]
        tail = [t["status"], t["n_docs"], t["peak_memory"]["peak_bytes"], t["peak_memory"]["kind"],
                t["data_seconds"], t["eval_seconds"]]
        metrics = t.get("metrics") or {}
        if not metrics:
            writer.writerow(base + ["", ""] + tail)
        for name, value in metrics.items():
            writer.writerow(base + [name, value] + tail)
    return buf.getvalue()


def _plots(out: Path, results: dict) -> list[str]:
    """Write the PNG plots; returns their file names (relative to ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family, tasks = results["family"], results["tasks"]
    ok = _ok(tasks)
    files = []
    if ok:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if family == "ppl":
            for t in ok:
                points = sorted(
                    (_bucket_mid(m), v) for m, v in t["metrics"].items()
                    if m.startswith("loss_") and not m.endswith("_stderr") and isinstance(v, (int, float))
                )
                ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=f"window {_length_label(t['length'])}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("position in the window (tokens, bucket middle)")
            ax.set_ylabel("loss (nats/token)")
            ax.set_title("Loss by position")
            name = "loss_vs_position.png"
        else:
            metric = _main_metric(family)
            series: dict[str, list[tuple[int, float]]] = {}
            if family == "mqar":
                for t in ok:
                    series.setdefault(f"{t['pairs']} pairs", []).append((t["length"], t["metrics"].get(metric)))
                for p in sorted({t["pairs"] for t in ok}):
                    ax.axhline(1 / p, linestyle=":", linewidth=0.8, color="gray")
            else:
                from mamba_eval.harness.probe_data import depth_label

                for t in ok:
                    series.setdefault("all depths", []).append((t["length"], t["metrics"].get(metric)))
                    for d in results["spec"]["depths"] or []:
                        series.setdefault(f"depth {d:g}", []).append(
                            (t["length"], t["metrics"].get(f"{metric}_depth_{depth_label(d)}")))
            for label, points in series.items():
                points = [(x, y) for x, y in points if isinstance(y, (int, float))]
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label,
                        linewidth=2.5 if label == "all depths" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(metric)
            ax.set_title(f"{family}: {metric} vs context length")
            name = "accuracy_vs_length.png"
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_fig(fig, out / name)
        plt.close(fig)
        files.append(name)
    if tasks:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        by_length: dict[int, dict] = {}
        for t in tasks:  # the largest figure per length (several MQAR pair counts share a length)
            cur = by_length.setdefault(t["length"], {"mem": 0, "time": 0.0})
            cur["mem"] = max(cur["mem"], t["peak_memory"]["peak_bytes"] or 0)
            cur["time"] = max(cur["time"], t["eval_seconds"])
        xs = sorted(by_length)
        ax1.plot(xs, [by_length[x]["mem"] / 2 ** 30 for x in xs], marker="o")
        ax1.set_xscale("log", base=2)
        ax1.set_ylim(bottom=0)
        ax1.set_xlabel("context length (tokens)")
        ax1.set_ylabel("peak memory (GiB)")
        ax1.set_title(tasks[0]["peak_memory"]["kind"], fontsize=9)
        ax2.plot(xs, [by_length[x]["time"] for x in xs], marker="o")
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("context length (tokens)")
        ax2.set_ylabel("evaluation time per task (s)")
        for a in (ax1, ax2):
            a.grid(True, alpha=0.3)
        fig.tight_layout()
        _save_fig(fig, out / "memory_time_vs_length.png")
        plt.close(fig)
        files.append("memory_time_vs_length.png")
    return files


def _bucket_mid(metric: str) -> float:
    from mamba_eval.harness.probe_data import parse_length

    lo, hi = metric[len("loss_"):].split("-")
    lo_n = parse_length(lo) if lo != "0" else 0
    return max(1.0, (lo_n + parse_length(hi)) / 2)


def _save_fig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    _write_atomic(path, buf.getvalue())


def _write_outputs(out: Path, results: dict, plots: bool) -> None:
    plot_files = _plots(out, results) if plots else [
        f for f in ("accuracy_vs_length.png", "loss_vs_position.png", "memory_time_vs_length.png") if (out / f).exists()
    ]
    _write_atomic(out / "results.json", _json_text(results))
    _write_atomic(out / "results.csv", _csv(results))
    _write_atomic(out / "report.md", _report(results, plot_files))


# ------------------------------------------------------------------------------ CLI

_DESCRIPTION = """\
Run a long-context probe family over context lengths and write a report (tables of accuracy
or loss vs length, PNG plots, peak memory and time per length) into --out.

families:
  mqar         multi-query associative recall (mamba_mqar_<len>_p<pairs>)
  passkey      a 5-digit key in filler text, likelihood among candidates (mamba_passkey_<len>)
  passkey_gen  the same documents, greedy generation (mamba_passkey_gen_<len>)
  ppl          loss by position in windows of a long text (mamba_ppl_position_<len>)

Lengths are tokens of the model's tokenizer (4096, 4k, 1m). Without --model_args the mqar
family runs on the offline probe model, trained into ~/.cache/mamba_eval/probe_model on first
use (a few minutes on a CPU).
"""


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe", help="long-context probes (passkey, MQAR, loss by position) over lengths, with a report",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--family", default="mqar", help="mqar (default), passkey, passkey_gen or ppl")
    parser.add_argument("--model", default="mamba", help="lm-eval model name (default: mamba)")
    parser.add_argument("--model_args", default=None,
                        help="lm-eval model_args; max_length is set from the lengths unless given "
                        "(default for mqar: the offline probe model)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated lengths in tokens, e.g. 1k,4k,16k (default per family: "
                        + "; ".join(f"{k} {v}" for k, v in DEFAULT_LENGTHS.items()) + ")")
    parser.add_argument("--depths", default=None, help="passkey depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--pairs", default=None, help=f"MQAR key-value pairs (default {DEFAULT_PAIRS}; "
                        f"{PROBE_MODEL_PAIRS} on the offline probe model, its training range)")
    parser.add_argument("--samples", type=int, default=None,
                        help="documents per task (passkey: per depth; ppl: windows); default depends on length")
    parser.add_argument("--seed", type=int, default=None, help="data seed (default 1234)")
    parser.add_argument("--text", default=None, metavar="FILE", help="ppl: a UTF-8 text file (default WikiText-2 test)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="ppl: the offline data folder holding WikiText-2 (default $MAMBA_EVAL_DATA_DIR)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: the model's default)")
    parser.add_argument("--batch_size", default=None,
                        help="lm-eval batch size (default: 1 on a GPU, one sequence at a time, so the memory "
                        "figures are per sequence; auto on the CPU)")
    parser.add_argument("--out", default=None, metavar="DIR", help="report folder (default runs/probe-<family>)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, extra: list[str]) -> int:
    results = run_probe(
        args.family, model=args.model, model_args=args.model_args, lengths=args.lengths, depths=args.depths,
        pairs=args.pairs, samples=args.samples, seed=args.seed, text=args.text, data_dir=args.data_dir,
        device=args.device, batch_size=args.batch_size, out=args.out or f"runs/probe-{args.family}",
        plots=not args.no_plots,
    )
    out = Path(args.out or f"runs/probe-{args.family}")
    print("\n".join(_result_table(results)))
    print()
    print("\n".join(_resource_table(results)))
    print(f"\nreport: {out / 'report.md'}")
    return 0 if _ok(results["tasks"]) else 1


if __name__ == "__main__":  # pragma: no cover
    from mamba_eval.commands.cli import main

    sys.exit(main(["probe", *sys.argv[1:]]))
