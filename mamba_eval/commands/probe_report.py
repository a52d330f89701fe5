"""The report of ``mamba-eval probe`` (:mod:`mamba_eval.commands.probe`): ``report.md`` with its
tables of accuracy (or loss) vs length and of peak memory and time per length, ``results.json``,
``results.csv`` and the PNG plots, from the results ``run_probe`` collects. Tables are written
through pytablewriter (:mod:`mamba_eval.commands.table_writers`).
"""

from __future__ import annotations

import math
from pathlib import Path

from mamba_eval.harness.probe_common import length_name, parse_length
from mamba_eval.harness.probe_passkey import PASSKEY_CANDIDATES, depth_label
from mamba_eval.utils import atomic_write, atomic_write_json

__all__ = ["figures", "gib", "longer_run_lines", "ok_tasks", "resource_table", "result_table", "write_outputs"]


def gib(n: int | None) -> str:
    """Bytes as GiB with two decimals ("n/a" for None)."""
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    from mamba_eval.commands.table_writers import markdown_table

    return markdown_table(head, rows).rstrip("\n").split("\n")


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


def ok_tasks(tasks: list[dict]) -> list[dict]:
    """The tasks that finished (status "ok")."""
    return [t for t in tasks if t.get("status") == "ok"]


def result_table(results: dict) -> list[str]:
    """The accuracy-vs-length (or loss-vs-position) table, as markdown lines."""
    family, tasks = results["family"], results["tasks"]
    metric = _main_metric(family)
    if family == "mqar":
        pairs = sorted({t["pairs"] for t in tasks})
        head = ["length"] + [f"acc, {p} pairs" for p in pairs]
        rows = [[_length_label(length)] + [
            _cell(next((t for t in tasks if t["length"] == length and t["pairs"] == p), None), metric)
            for p in pairs] for length in sorted({t["length"] for t in tasks})]
        note = ("Chance for a model that only knows the answer is one of the values seen: about 1/pairs "
                "(" + ", ".join(f"{1 / p:.3f}" for p in pairs) + ").")
    elif family in ("passkey", "passkey_gen"):
        depths = results["spec"]["depths"] or []
        cols = [(metric, "all depths")] + [(f"{metric}_depth_{depth_label(d)}", f"depth {d:g}") for d in depths]
        head = ["length"] + [label for _, label in cols]
        rows = [[_length_label(t["length"])] + [_cell(t, m) for m, _ in cols] for t in tasks]
        if family == "passkey":
            note = ("Metric: the key has the highest log-likelihood among the candidates "
                    f"(chance 1/{PASSKEY_CANDIDATES}).")
        else:
            note = "Metric: greedy generation's leading digits equal the key."
    else:  # ppl
        buckets = []
        for t in tasks:
            for m in (t.get("metrics") or {}):
                if m.startswith("loss_") and not m.endswith("_stderr") and m not in buckets:
                    buckets.append(m)
        buckets.sort(key=_bucket_start)
        head = ["window", "loss (all)"] + [b[len("loss_"):] for b in buckets]
        rows = [[_length_label(t["length"]), _cell(t, "loss")] + [_cell(t, b) for b in buckets] for t in tasks]
        note = ("Loss in nats per token (token-weighted over windows) of the tokens at those positions "
                "from the window start, each conditioned on the whole window before it.")
    return _markdown(head, rows) + ["", note]


def _bucket_start(metric: str) -> int:
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
    name = length_name(length)
    return name if name == str(length) else f"{name} ({length})"


def resource_table(results: dict) -> list[str]:
    """Per task: documents, context tokens, peak memory, data and evaluation time (Markdown lines)."""
    tasks = results["tasks"]
    kind = next((t["peak_memory"]["kind"] for t in tasks), "n/a")
    head = ["task", "length", "docs", "context tokens", f"peak memory ({kind})", "data s", "eval s", "tokens/s"]
    rows = []
    for t in tasks:
        if "context_tokens_min" in t:
            tokens = (f"{t['context_tokens_min']}" if t["context_tokens_min"] == t["context_tokens_max"]
                      else f"{t['context_tokens_min']}-{t['context_tokens_max']}")
        else:
            tokens = f"{t.get('scored_tokens', '-')} scored"
        rows.append([t["task"], _length_label(t["length"]), str(t["n_docs"]), tokens,
                     gib(t["peak_memory"]["peak_bytes"]), str(t["data_seconds"]), str(t["eval_seconds"]),
                     str(t.get("tokens_per_second") or "-")])
    return _markdown(head, rows)


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
            f"The model is the probe model shipped in the package (`mamba_eval.commands.probe_model`, "
            f"training version {trained.get('train_version')}): trained on MQAR at {trained['config']['length']} "
            f"tokens with 1-{trained['config']['max_pairs']} pairs, {trained['config']['steps']} steps; held-out "
            "accuracy at the training length: " + ", ".join(f"{v:.3f} ({p} pairs)" for p, v in acc.items()) + ".",
            "",
        ]
    if results.get("status") == "running" or len(results["tasks"]) < _expected_tasks(results):
        lines += [f"*Partial: {len(results['tasks'])} of {_expected_tasks(results)} tasks done.*", ""]
    lines += ["## Results", ""] + result_table(results) + [""]
    lines += ["## Peak memory and time per length", ""] + resource_table(results) + [""]
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
    longer = results.get("longer")
    if longer:
        lines += ["## Longer contexts", "", _longer_sentence(longer), "", "```sh", longer["command"], "```", ""]
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


def _longer_sentence(longer: dict) -> str:
    return (f"This run stopped short of the family's long lengths ({', '.join(map(_tick_label, longer['lengths']))} "
            "tokens: minutes per length on a CPU, seconds on a GPU); `--lengths` runs them, e.g.:")


def longer_run_lines(results: dict) -> list[str]:
    """How to run the long lengths this run left out (plain text lines; none when it ran them)."""
    longer = results.get("longer")
    return [_longer_sentence(longer), f"    {longer['command']}"] if longer else []


def _expected_tasks(results: dict) -> int:
    spec = results["spec"]
    return len(spec["lengths"]) * len(spec["pairs"] or [None])


def _args_string(args: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def _csv(results: dict) -> str:
    """One row per task and metric (one without a metric for a task that did not finish)."""
    from mamba_eval.commands.table_writers import csv_table

    def text(value) -> str:
        return "" if value is None else str(value)

    rows = []
    for t in results["tasks"]:
        base = [results["family"], t["task"], t["length"], t["pairs"]]
        tail = [t["status"], t["n_docs"], t["peak_memory"]["peak_bytes"], t["peak_memory"]["kind"],
                t["data_seconds"], t["eval_seconds"]]
        metrics = t.get("metrics") or {}
        if not metrics:
            rows.append(base + [None, None] + tail)
        rows += [base + [name, value] + tail for name, value in metrics.items()]
    head = ["family", "task", "length", "pairs", "metric", "value", "status", "n_docs",
            "peak_memory_bytes", "peak_memory_kind", "data_seconds", "eval_seconds"]
    return csv_table(head, [[text(v) for v in row] for row in rows])


def figures(results: dict) -> dict:
    """The report's plots as matplotlib figures, by file name: accuracy (or loss) vs length
    (``accuracy_vs_length.png`` or ``loss_vs_position.png``), when a task finished, and
    ``memory_time_vs_length.png``, when any ran. The caller closes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family, tasks = results["family"], results["tasks"]
    ok = ok_tasks(tasks)
    out = {}
    if ok:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if family == "ppl":
            mids = []
            for t in ok:
                points = sorted(
                    (_bucket_mid(m), v) for m, v in t["metrics"].items()
                    if m.startswith("loss_") and not m.endswith("_stderr") and isinstance(v, (int, float))
                )
                mids += [p for p, _ in points]
                ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=f"window {_length_label(t['length'])}")
            if mids:
                low, high = math.floor(math.log2(min(mids))), math.ceil(math.log2(max(mids)))
                _log2_axis(ax, [2 ** k for k in range(low, high + 1)])
            ax.set_xlabel("position in the window (tokens, bucket middle)")
            ax.set_ylabel("loss (nats/token)")
            ax.set_title("Loss by position")
            name = "loss_vs_position.png"
        else:
            metric = _main_metric(family)
            series: dict[str, list[tuple[int, float]]] = {}
            pairs_of: dict[str, int] = {}  # MQAR series -> pair count
            if family == "mqar":
                for t in ok:
                    pairs_of[f"{t['pairs']} pairs"] = t["pairs"]
                    series.setdefault(f"{t['pairs']} pairs", []).append((t["length"], t["metrics"].get(metric)))
            else:
                for t in ok:
                    series.setdefault("all depths", []).append((t["length"], t["metrics"].get(metric)))
                    for d in results["spec"]["depths"] or []:
                        series.setdefault(f"depth {d:g}", []).append(
                            (t["length"], t["metrics"].get(f"{metric}_depth_{depth_label(d)}")))
            for label, points in series.items():
                points = [(x, y) for x, y in points if isinstance(y, (int, float))]
                (line,) = ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label,
                                  linewidth=2.5 if label == "all depths" else 1.2)
                if label in pairs_of:  # "one of the P values seen", in the colour of its pair count
                    p = pairs_of[label]
                    ax.axhline(1 / p, linestyle=":", linewidth=1, color=line.get_color(),
                               label=f"chance, {p} pairs (1/{p})")
            if family == "passkey":
                ax.axhline(1 / PASSKEY_CANDIDATES, linestyle=":", linewidth=1, color="gray",
                           label=f"chance (1/{PASSKEY_CANDIDATES} candidates)")
            _log2_axis(ax, [t["length"] for t in ok])
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(metric)
            ax.set_title(f"{family}: {metric} vs context length")
            name = "accuracy_vs_length.png"
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out[name] = fig
    if tasks:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.3))
        by_length: dict[int, dict] = {}
        for t in tasks:  # the largest figure per length (several MQAR pair counts share a length)
            cur = by_length.setdefault(t["length"], {"mem": 0, "time": 0.0})
            cur["mem"] = max(cur["mem"], t["peak_memory"]["peak_bytes"] or 0)
            cur["time"] = max(cur["time"], t["eval_seconds"])
        pairs = sorted({t["pairs"] for t in tasks if t["pairs"] is not None})
        several = len(pairs) > 1
        xs = sorted(by_length)
        ax1.plot(xs, [by_length[x]["mem"] / 2 ** 30 for x in xs], marker="o")
        ax1.set_ylim(bottom=0)
        ax1.set_ylabel("peak memory (GiB)" + (", max over pair counts" if several else ""))
        ax1.set_title(tasks[0]["peak_memory"]["kind"], fontsize=9)
        ax2.plot(xs, [by_length[x]["time"] for x in xs], marker="o")
        ax2.set_yscale("log")
        _plain_log_ticks(ax2.yaxis)
        ax2.set_ylabel("evaluation time (s)" + (", slowest pair count" if several else ""))
        for a in (ax1, ax2):
            _log2_axis(a, xs)
            a.set_xlabel("context length (tokens)")
            a.grid(True, alpha=0.3)
        fig.suptitle("Peak memory and evaluation time per length"
                     + (f": the maximum over the {', '.join(map(str, pairs))} pair tasks of each length"
                        if several else ""), fontsize=10)
        fig.tight_layout()
        out["memory_time_vs_length.png"] = fig
    return out


def _tick_label(x: float) -> str:
    """256, 1K, 4K, 16K, 1M (binary K and M), else the number."""
    n = int(round(x))
    return length_name(n).upper() if n > 0 and abs(x - n) < 1e-6 else f"{x:g}"


def _log2_axis(ax, ticks) -> None:
    """A base-2 log x axis with ticks at ``ticks`` (thinned to at most 8), labelled by
    :func:`_tick_label`, and no minor ticks: matplotlib's default labels them 2^8, 2^10, ..."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted(set(ticks))
    ticks = ticks[::math.ceil(len(ticks) / 8)] if ticks else ticks
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _tick_label(x)))
    ax.xaxis.set_minor_locator(NullLocator())


def _plain_log_ticks(axis) -> None:
    """Ticks at 1, 2 and 5 times the powers of ten, labelled 0.5, 1, 20 (not 10^0 and unlabelled
    minor ticks)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
    axis.set_minor_locator(NullLocator())


def _plots(out: Path, results: dict) -> list[str]:
    """Write the PNG plots; returns their file names (relative to ``out``)."""
    import matplotlib.pyplot as plt

    files = []
    for name, fig in figures(results).items():
        _save_fig(fig, out / name)
        plt.close(fig)
        files.append(name)
    return files


def _bucket_mid(metric: str) -> float:
    lo, hi = metric[len("loss_"):].split("-")
    lo_n = parse_length(lo) if lo != "0" else 0
    return max(1.0, (lo_n + parse_length(hi)) / 2)


def _save_fig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    atomic_write(path, buf.getvalue())


def write_outputs(out: Path, results: dict, plots: bool) -> None:
    """Write ``results.json``, ``results.csv``, ``report.md`` and (with ``plots``) the PNG plots
    into the existing folder ``out``, each file atomically."""
    plot_files = _plots(out, results) if plots else [
        f for f in ("accuracy_vs_length.png", "loss_vs_position.png", "memory_time_vs_length.png") if (out / f).exists()
    ]
    atomic_write_json(out / "results.json", results)
    atomic_write(out / "results.csv", _csv(results))
    atomic_write(out / "report.md", _report(results, plot_files))
