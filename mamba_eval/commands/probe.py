"""``mamba-eval probe``: long-context probes over context lengths, with a report.

    mamba-eval probe [--family mqar|passkey|passkey_gen|ppl] [--model_args pretrained=...]
                     [--lengths 1k,4k,16k] [--depths 0,0.5,1] [--pairs 4,8,16] [--samples N]
                     [--text FILE] [--data-dir DIR] [--device cuda] [--batch_size 1] [-o DIR]

For every length (and, for MQAR, every number of pairs) it runs one lm-eval task of
``mamba_eval.harness.probe_data`` through lm-eval's own ``simple_evaluate`` on one model instance,
and records the metrics, the documents' measured token counts, the time spent building the
data and evaluating, and the peak memory of the evaluation: ``torch.cuda.max_memory_allocated``
on a GPU; on the CPU the process's resident set size, sampled every 10 ms (labelled as such).
Then it writes into ``--output`` (each file atomically, also after every length, so an interrupted
run keeps what it measured; the report is :mod:`mamba_eval.commands.probe_report`):

- ``report.md``: accuracy (or loss) vs length tables, peak memory and time per length, plots;
- ``results.json`` (everything) and ``results.csv`` (one row per task and metric);
- ``tasks/``: the task configs used (``lm_eval --include_path OUT/tasks`` reruns any of them);
- ``lm_eval/<task>.json``: lm-eval's own output per task;
- ``accuracy_vs_length.png`` (or ``loss_vs_position.png``) and ``memory_time_vs_length.png``.

The default lengths are short (:data:`DEFAULT_LENGTHS`: about a minute on 2 CPU cores for the
probe model); the report and the command's output name the long ones (:data:`LONG_LENGTHS`) and
the ``--lengths`` that runs them. Without ``--model_args`` the MQAR family runs on the probe model
shipped in the package (``mamba_eval.commands.probe_model``). ``max_length`` is set from the
longest length unless given; for ``--model mamba``, ``batch_invariant`` defaults to false (see
``run_probe``). An out-of-memory error at one length is recorded as that length's result and the
run goes on. Bad input raises :class:`~mamba_eval.errors.MambaEvalError`.

This module's top level imports only the standard library (the CLI starts fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["DEFAULT_LENGTHS", "LONG_LENGTHS", "ProbeSpec", "add_subcommand", "run_probe"]

PROG = "mamba-eval probe"
FAMILY_NAMES = ("mqar", "passkey", "passkey_gen", "ppl")

#: Default lengths per family (tokens): short, so that a first run on a CPU takes about a minute
#: (the probe model) or a few (a 130M model).
DEFAULT_LENGTHS = {
    "mqar": "256,512,1k,2k",
    "passkey": "1k,2k,4k",
    "passkey_gen": "1k,2k,4k",
    "ppl": "4k",
}
#: The long lengths the output suggests (``--lengths``): minutes per length on a CPU, seconds on a GPU.
LONG_LENGTHS = {
    "mqar": "4k,16k,64k",
    "passkey": "16k,64k,256k,1m",
    "passkey_gen": "16k,64k,256k,1m",
    "ppl": "16k,64k",
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
        from mamba_eval.errors import MambaEvalError
        from mamba_eval.harness.probe_common import DEFAULT_SEED, parse_length, parse_lengths
        from mamba_eval.harness.probe_passkey import PASSKEY_DEPTHS, parse_depths
        from mamba_eval.harness.probe_ppl import read_text
        from mamba_eval.utils import data_dir_from_env

        if family not in FAMILY_NAMES:
            raise MambaEvalError(f"unknown probe family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
        self.family = family
        if lengths is None:
            lengths = DEFAULT_LENGTHS[family]
        self.lengths = parse_lengths(lengths) if isinstance(lengths, str) else [parse_length(n) for n in lengths]
        passkey = family in ("passkey", "passkey_gen")
        if depths is not None and not passkey:
            raise MambaEvalError(f"--depths applies to the passkey families, not {family}")
        self.depths = parse_depths(depths if depths is not None else PASSKEY_DEPTHS) if passkey else None
        if pairs is not None and family != "mqar":
            raise MambaEvalError(f"--pairs applies to the mqar family, not {family}")
        self.pairs = _parse_ints("--pairs", pairs if pairs is not None else DEFAULT_PAIRS) if family == "mqar" else [None]
        if samples is not None and int(samples) < 1:
            raise MambaEvalError(f"--samples {samples}: must be at least 1")
        self.samples = None if samples is None else int(samples)
        self.seed = DEFAULT_SEED if seed is None else int(seed)
        if (text or data_dir) and family != "ppl":
            raise MambaEvalError(f"--text and --data-dir apply to the ppl family, not {family}")
        self.text = str(Path(text).expanduser().resolve()) if text else None
        self.data_dir = str(Path(data_dir).expanduser().resolve()) if data_dir else None
        if family == "ppl":
            # Read it now: a missing or unreadable file fails before any model is loaded.
            read_text(self.text, self.data_dir or data_dir_from_env())
        if family == "mqar":
            for length in self.lengths:
                for p in self.pairs:
                    if 4 * p + 1 > length:
                        raise MambaEvalError(f"MQAR length {length} is too short for {p} pairs (needs more than {4 * p})")

    def tasks(self) -> list[dict]:
        """One entry per task: name, length, pairs, config (dict)."""
        from mamba_eval.harness.probe_data import task_config
        from mamba_eval.harness.probe_passkey import PASSKEY_DEPTHS

        out = []
        for length in self.lengths:
            for pairs in self.pairs:
                cfg = task_config(
                    self.family, length, pairs=pairs, samples=self.samples, seed=self.seed,
                    depths=self.depths or PASSKEY_DEPTHS, text_file=self.text, data_dir=self.data_dir,
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
    longer = _longer_run(family, model, args, spec.lengths)
    trained = None
    if default_model:
        if model != "mamba" or family != "mqar":
            raise MambaEvalError(
                f"give --model_args pretrained=... for the {family} family (the default model, the shipped "
                f"probe model trained on MQAR's word vocabulary, runs the mqar family only)"
            )
        from mamba_eval.commands.probe_model import RECORD_FILE, default_probe_model

        args["pretrained"] = str(default_probe_model())
        trained = json.loads((Path(args["pretrained"]) / RECORD_FILE).read_text())
        trained.pop("losses", None)  # the training curve stays with the model
    for key, value in (("device", device), ("batch_size", batch_size)):
        if value is not None:
            if key in args and str(args[key]) != str(value):
                raise MambaEvalError(f"--{key} {value} contradicts model_args {key}={args[key]}")
            args[key] = value
    if "batch_size" not in args:
        # One sequence at a time on a GPU, so the memory figures are those of one sequence; the
        # CPU's budget (a share of free memory) batches a large model's many small forwards. Not
        # the probe model's: its batches of many rows only move memory (the default run took 2-3x
        # as long on 2 busy cores as with one row at a time).
        import torch

        wanted = str(args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        args["batch_size"] = 1 if wanted.startswith("cuda") or default_model else "auto"
    if model == "mamba":
        # The CPU's batch-invariance filler gives a lone long context up to 64 x threads rows
        # (mamba_eval.harness.engine.forward_shape): 10x the memory and 17x the time at 16K tokens on
        # 2 threads. A probe compares lengths, not batch sizes; batch_invariant=true keeps it.
        args.setdefault("batch_invariant", False)
    from mamba_eval.commands.probe_report import gib, write_outputs
    from mamba_eval.harness import probe_data as pd
    from mamba_eval.harness.probe_common import PROBE_DATA_VERSION, length_name
    from mamba_eval.utils import atomic_write_json

    needed = pd.required_max_length(spec.lengths)
    if "max_length" not in args:
        args["max_length"] = needed

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tasks = spec.tasks()
    task_dir = pd.write_task_configs(
        out / "tasks", {f"{t['task']}.yaml": pd.render_yaml(t["config"], pd.HEADER) for t in tasks}
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

    # The probe model's forwards are small kernels: a second OpenMP thread buys little and, on
    # a CPU busy with other work, makes every kernel wait for the slower thread.
    from mamba_eval.commands.probe_model import torch_threads

    with torch_threads(1 if default_model and device_type == "cpu" else None):
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
            "data_version": PROBE_DATA_VERSION,
            "longer": longer,
            "tasks": [],
        }
        for entry in tasks:
            name = entry["task"]
            log(f"{name}: building data")
            record: dict[str, Any] = {"task": name, "length": entry["length"], "pairs": entry["pairs"],
                                      "length_name": length_name(entry["length"])}
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
                (out / "lm_eval").mkdir(exist_ok=True)
                atomic_write_json(out / "lm_eval" / f"{name}.json", keep)
            record["eval_seconds"] = round(time.perf_counter() - t1, 2)
            record["tokens_per_second"] = (
                round(record["context_tokens_total"] / record["eval_seconds"]) if record["eval_seconds"] > 0 else None
            )
            record["peak_memory"] = peak.as_dict()
            results["tasks"].append(record)
            log(f"{name}: {record['status']}, {record['eval_seconds']} s, peak {gib(record['peak_memory']['peak_bytes'])}")
            write_outputs(out, results, plots=False)
        write_outputs(out, results, plots=plots)
    return results


def _longer_run(family: str, model: str, user_args: dict, lengths: list[int]) -> dict | None:
    """The family's long lengths beyond the run's longest, and a command that runs them (the
    run's family, model and model_args as given; ``max_length`` is left to be set from the new
    lengths), or None when the run reached them."""
    import shlex

    from mamba_eval.harness.probe_common import length_name, parse_lengths

    longer = [n for n in parse_lengths(LONG_LENGTHS[family]) if n > max(lengths)]
    if not longer:
        return None
    words = []
    if family != "mqar":
        words += ["--family", family]
    if model != "mamba":
        words += ["--model", model]
    kept = {k: v for k, v in user_args.items() if k != "max_length"}
    if kept:
        words += ["--model_args", ",".join(f"{k}={v}" for k, v in kept.items())]
    words += ["--lengths", ",".join(length_name(n) for n in longer)]
    return {"lengths": longer, "command": " ".join([PROG, *map(shlex.quote, words)])}


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


# ------------------------------------------------------------------------------ CLI

_DESCRIPTION = """\
Run a long-context probe family over context lengths and write a report (tables of accuracy
or loss vs length, PNG plots, peak memory and time per length) into --output.

families:
  mqar         multi-query associative recall (mamba_mqar_<len>_p<pairs>)
  passkey      a 5-digit key in filler text, likelihood among candidates (mamba_passkey_<len>)
  passkey_gen  the same documents, greedy generation (mamba_passkey_gen_<len>)
  ppl          loss by position in windows of a long text (mamba_ppl_position_<len>)

Lengths are tokens of the model's tokenizer (4096, 4k, 1m). The default lengths are short; the
long ones (--lengths, e.g. --lengths 4k,16k) take minutes per length on a CPU. Without
--model_args the mqar family runs on the probe model shipped in the package (a tiny Mamba-2
trained on MQAR at 256 tokens; scripts/train_probe_model.py regenerates it).
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
                        "(default for mqar: the probe model shipped in the package)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated lengths in tokens, e.g. 1k,4k,16k (default, short, per family: "
                        + "; ".join(f"{k} {v}" for k, v in DEFAULT_LENGTHS.items()) + "; long ones: "
                        + "; ".join(f"{k} {v}" for k, v in LONG_LENGTHS.items()) + ")")
    parser.add_argument("--depths", default=None, help="passkey depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--pairs", default=None, help=f"MQAR key-value pairs (default {DEFAULT_PAIRS}; "
                        f"{PROBE_MODEL_PAIRS} on the shipped probe model, its training range)")
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
    # '--out', the former spelling, still works: argparse takes an unambiguous prefix of '--output'.
    parser.add_argument("-o", "--output", dest="out", default=None, metavar="DIR",
                        help="report folder (default runs/probe-<family>)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, extra: list[str]) -> int:
    results = run_probe(
        args.family, model=args.model, model_args=args.model_args, lengths=args.lengths, depths=args.depths,
        pairs=args.pairs, samples=args.samples, seed=args.seed, text=args.text, data_dir=args.data_dir,
        device=args.device, batch_size=args.batch_size, out=args.out or f"runs/probe-{args.family}",
        plots=not args.no_plots,
    )
    from mamba_eval.commands.probe_report import longer_run_lines, ok_tasks, resource_table, result_table

    out = Path(args.out or f"runs/probe-{args.family}")
    print("\n".join(result_table(results)))
    print()
    print("\n".join(resource_table(results)))
    print(f"\nreport: {out / 'report.md'}")
    hint = longer_run_lines(results)
    if hint:
        print("\n" + "\n".join(hint))
    return 0 if ok_tasks(results["tasks"]) else 1


if __name__ == "__main__":  # pragma: no cover
    from mamba_eval.commands.cli import main

    sys.exit(main(["probe", *sys.argv[1:]]))
