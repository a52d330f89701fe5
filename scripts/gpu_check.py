"""One command for the GPU machine: every GPU-only test and the benchmarks, written as a record;
and, on any machine, the tables of docs/performance.md rendered from the records.

A record (JSON) holds, for each part run: the tests' results (passed, failed, skipped with their
reasons), or a benchmark's table (its rows, the command that produced them, and which peer was
measured beside ours in the same run), with the GPU's name and measured peaks, the commit (and
whether tracked files differed from it), the UTC date and the versions. Parts (``--only``):

    tests-kernels  MAMBA_EVAL_TEST_SIZES=real pytest on the GEMM, MoE and norm kernels (tests/kernels)
    tests-scans    the same for the scan, step and conv kernels
    tests-model    the other tests that need CUDA or take a CUDA path (GPU_TESTS below)
    model gen kernels eval 7b gen-task memory   scripts/bench_model.py, bench_generate.py,
                   bench_kernels.py, bench_eval.py, bench_7b.py, bench_gen_task.py, probe_memory.py
    tests = both test groups; all = everything (more than one 10-minute command holds)

Workflow (the GPU machine takes one command of at most 10 minutes, 30 minutes a session):

1. On the CPU machine, from the repository root:
       ../shared/device/wheelhouse.sh          # .whl/: lm-eval and what else the GPU image lacks
       pip download --no-deps -d .whl pytest-xdist execnet   # optional: the tests on several workers
       ../shared/device/peers.sh fetch         # .whl/peers/: mamba_ssm and causal_conv1d sources
       python scripts/gpu_check.py --prepare   # runs/gpu_check/: the commit stamp and the data
2. On the GPU machine, carrying ``.whl`` and ``runs/gpu_check``, one call after the other (the
   machine is given back 30 s after a call; the peers build on in the background meanwhile). Each
   call notes its start (``--since``: the budget counts from there), installs the wheels as
   ../shared/device/README.md says and the project:
       S=$(date +%s) &&
       python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
       python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
           .whl/*.tar.gz .whl/*.zip &&
       export PYTHONPATH=/tmp/site:$PYTHONPATH &&
       python3 -m pip install -q --no-deps --no-build-isolation -e . &&
   and goes on with one of
       bash .whl/peers/build.sh start; python3 scripts/gpu_check.py --since $S --only tests-kernels --out $OUT
       python3 scripts/gpu_check.py --since $S --only tests-scans --out $OUT
       python3 scripts/gpu_check.py --since $S --only tests-model --out $OUT
       bash .whl/peers/build.sh wait; python3 scripts/gpu_check.py --since $S --only model,gen,kernels --out $OUT
       python3 scripts/gpu_check.py --since $S --only eval --out $OUT
   Each writes ``$OUT/record-<UTC time>.json`` after every part (a command cut at its limit keeps
   the parts done; ``--budget`` stops the part running before the limit) and ``$OUT/gpu_check.log``.
3. Back on the CPU machine: copy the records into docs/perf-records/ and render them all:
       python scripts/gpu_check.py --render
   This rewrites only the part of docs/performance.md between ``<!-- gpu_check:begin -->`` and
   ``<!-- gpu_check:end -->``. Records merge by date: a later record replaces the parts it has and
   leaves the others. Commit the records and the page.

The rendered tables show peer columns (mamba_ssm, causal_conv1d, lm-eval's mamba_ssm wrapper) only
where the peer ran in the same run as ours; stored figures never appear there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, STAMP, utc_now, write_json, write_stamp  # noqa: E402

RECORDS = REPO / "docs" / "perf-records"
DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
PREPARED_DATA = STAMP.parent / "data"

#: Tests that need a CUDA GPU or take a CUDA path when one is there (the kernels at real sizes).
GPU_TESTS = {
    # The kernels at real sizes take more than one command's time: two groups, one per command.
    "tests-kernels": [f"tests/kernels/test_{name}.py" for name in (
        "matmul", "matmul_hopper", "moe", "batch_invariance", "norm", "refs", "utils", "without_triton")],
    "tests-scans": [f"tests/kernels/test_{name}.py" for name in (
        "conv1d", "mamba1_step", "mamba3", "mamba3_scan", "mamba3_step", "selective_scan", "ssd")],
    "tests-model": ["tests/test_gpu_engine.py", "tests/test_gpu_generation.py", "tests/test_gpu_lm_eval.py",
                    "tests/test_model_triton.py", "tests/test_model_invariant.py", "tests/test_lengths.py",
                    "tests/test_falcon_codestral.py::test_triton_backend_matches_reference",
                    "tests/test_hybrid.py::test_triton_backend_matches_reference"],
}
#: Benchmark parts: (title, command without --json).
BENCHES = {
    "model": ("Model forward, all-position logits", ["scripts/bench_model.py", "--no-cold-start"]),
    "gen": ("Cached generation, prompt 128, 256 new tokens", ["scripts/bench_generate.py", "--no-eager"]),
    "kernels": ("Kernels", ["scripts/bench_kernels.py"]),
    "eval": ("Full HellaSwag through lm_eval", ["scripts/bench_eval.py"]),
    "7b": ("7B shapes", ["scripts/bench_7b.py"]),
    "gen-task": ("Generation task through lm-eval (128 answers of 256 tokens)", ["scripts/bench_gen_task.py"]),
    "memory": ("Passkey probe memory", ["scripts/probe_memory.py", "--lengths", "16k,1m"]),
}
PARTS = [*GPU_TESTS, *BENCHES]
ALIASES = {"tests": list(GPU_TESTS), "all": PARTS}


# ------------------------------------------------------------------------------- running (GPU)


def data_dir() -> Path:
    if os.environ.get("MAMBA_EVAL_DATA_DIR"):
        return Path(os.environ["MAMBA_EVAL_DATA_DIR"])
    return PREPARED_DATA if PREPARED_DATA.is_dir() else REPO.parent / "shared" / "data"


def child_env(peaks_file: Path) -> dict:
    return {**os.environ, "MAMBA_EVAL_DATA_DIR": str(data_dir()), "MAMBA_EVAL_PEAKS": str(peaks_file),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _default_sigint() -> None:
    """In the child before it starts: SIGINT back to its default. A process started in the
    background (or by a test worker) may inherit SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the interrupt below would not stop pytest."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int | None, float]:
    """(exit status or None when cut at ``timeout``, seconds); output appended to ``log``."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n===== {utc_now()} {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest then still writes its report (the tests run so far, the
            # failures among them) before it exits.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and whatever it started (lm_eval children)
                proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def parse_junit(path: Path) -> dict:
    """Counts, failing test ids and skip reasons from pytest's JUnit XML."""
    counts, failures, skips = Counter(), [], Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[outcome] += 1
        if outcome in ("failure", "error"):
            failures.append(name)
        elif outcome == "skipped":
            skips[next(c for c in case if c.tag == "skipped").get("message", "")] += 1
    return {"passed": counts["passed"], "failed": counts["failure"], "errors": counts["error"],
            "skipped": counts["skipped"], "failures": sorted(failures), "skip_reasons": dict(sorted(skips.items()))}


def test_workers() -> list[str]:
    """pytest-xdist arguments when it is installed: the tests' time there goes mostly to compiling
    Triton kernels on the CPU, so a few workers sharing the one GPU finish in a fraction of the time."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", str(max(1, min(12, (os.cpu_count() or 1) - 2)))]


def run_tests(group: str, env: dict, log: Path, work: Path, timeout: float) -> dict:
    xml = work / f"{group}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=15", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *test_workers(), *GPU_TESTS[group]]
    rc, seconds = run_logged(cmd, {**env, "MAMBA_EVAL_TEST_SIZES": "real"}, log, timeout)
    entry = {"command": "MAMBA_EVAL_TEST_SIZES=real python -m pytest " + " ".join(GPU_TESTS[group]),
             "seconds": round(seconds, 1)}
    if not xml.is_file():
        return {**entry, "status": "cut at the time budget" if rc is None else f"pytest exited {rc} without a report"}
    result = parse_junit(xml)
    status = ("cut at the time budget" if rc is None else "passed" if rc == 0
              else "failed" if result["failed"] or result["errors"] else f"pytest exited {rc}")
    return {**entry, **result, "status": status}


def run_bench(part: str, env: dict, log: Path, work: Path, timeout: float) -> dict | str:
    """The part's table, or why there is none."""
    out = work / f"{part}.json"
    cmd = BENCHES[part][1]  # the data folder comes from MAMBA_EVAL_DATA_DIR (child_env)
    rc, seconds = run_logged([sys.executable, *cmd, "--json", str(out)], env, log, timeout)
    if rc is None:
        return f"cut at the time budget after {seconds:.0f} s"
    if not out.is_file():
        return f"exited {rc} without results (see gpu_check.log)"
    table = SUMMARIES[part](json.loads(out.read_text()))
    return {"title": BENCHES[part][0], "command": "python " + " ".join(cmd), "returncode": rc,
            "seconds": round(seconds, 1), **table}


def machine_info(env: dict) -> dict:
    """The GPU's name and measured peaks (cached for the benchmarks through MAMBA_EVAL_PEAKS), the
    commit, the versions and the peers that import, from a child process (this one keeps no GPU memory)."""
    code = ("import json, sys; sys.path.insert(0, 'scripts'); import bench_common as b; "
            "print(json.dumps({**b.run_info(with_peaks=True), 'peers': b.peer_versions()}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"could not read the machine's details:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_parts(parts: list[str], out_dir: Path, budget: float) -> int:
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gpu_check.log"
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        env = child_env(work / "peaks.json")
        info = machine_info(env)
        if not info["gpu"]:
            print("gpu_check.py: no CUDA GPU here; --render and --prepare run anywhere", file=sys.stderr)
            return 2
        record = {"format": 1, **{k: info[k] for k in ("gpu", "commit", "dirty", "date", "torch", "triton", "peers")},
                  "peaks": {info["gpu"]: info["peaks"]}, "tests": {}, "measures": {}, "incomplete": {}}
        path = out_dir / f"record-{record['date'].replace('-', '').replace(':', '')}.json"
        print(f"{info['gpu']}, commit {info['commit']}{' (dirty)' if info['dirty'] else ''}; peers: "
              f"{', '.join(f'{k} {v}' for k, v in info['peers'].items() if v) or 'none'}", flush=True)
        for part in parts:
            left = budget - (time.perf_counter() - start)
            if left < 30:
                record["incomplete"][part] = "not started: the time budget was spent"
            elif part in GPU_TESTS:
                record["tests"][part] = run_tests(part, env, log, work, left)
            else:
                result = run_bench(part, env, log, work, left)
                if isinstance(result, str):
                    record["incomplete"][part] = result
                else:
                    record["measures"][part] = result
            write_json(path, record)
            entry = record["tests"].get(part) or record["measures"].get(part)
            status = record["incomplete"].get(part) or (entry.get("status") or f"exit {entry['returncode']}, "
                                                         f"{len(entry['rows'])} rows")
            print(f"{part}: {status} ({time.perf_counter() - start:.0f} s so far)", flush=True)
    print(f"wrote {path}")
    bad = record["incomplete"] or any(t["status"] != "passed" for t in record["tests"].values()) \
        or any(m["returncode"] for m in record["measures"].values())
    return 1 if bad else 0


# ------------------------------------------------------------------------------- tables from a benchmark's JSON
# Each returns {"columns": [[key, header, format], ...], "rows": [{key: value}], "peer": str | None};
# peer columns appear only when the benchmark measured the peer in the same run.


def _col(key, header, fmt=None):
    return [key, header, fmt]


def summarize_model(data: dict) -> dict:
    peer = data.get("peer")
    columns = [_col("shape", "shape"), _col("batch", "batch"), _col("tokens_per_s", "tok/s", ",.0f"),
               _col("roofline_share", "share of bf16 matmul peak", "%"), _col("rel_err_vs_ref", "err vs ref", ".1e")]
    if peer:
        columns += [_col("peer_tokens_per_s", "mamba_ssm tok/s", ",.0f"),
                    _col("speed_vs_peer", "speed vs mamba_ssm", "x")]
    rows = [{"shape": shape, "batch": f"B={r['batch']} L={r['length']}", "rel_err_vs_ref": entry["rel_err_vs_ref"],
             **{k: r.get(k) for k in ("tokens_per_s", "roofline_share", "peer_tokens_per_s", "speed_vs_peer")}}
            for shape, entry in data["shapes"].items() for r in entry["runs"]]
    return {"columns": columns, "rows": rows, "peer": peer}


def summarize_gen(data: dict) -> dict:
    peer = data.get("peer")
    columns = [_col("shape", "shape"), _col("batch", "batch"),
               _col("graphs_ms_per_token", "ms/token (graphs, default)", ".3f"),
               _col("graphs_1_step_ms_per_token", "ms/token (graphs, 1 step)", ".3f"),
               _col("graphs_bf16_state_ms_per_token", "ms/token (bf16 state)", ".3f"),
               _col("eager_ms_per_token", "ms/token (eager)", ".3f"), _col("same_tokens", "same tokens")]
    if peer:
        columns += [_col("peer_ms_per_token", "mamba_ssm cg ms/token", ".3f"),
                    _col("speed_vs_peer", "speed vs mamba_ssm", "x")]
    return {"columns": columns, "rows": [{c[0]: r.get(c[0]) for c in columns} for r in data["results"]], "peer": peer}


def summarize_eval(data: dict) -> dict:
    peer = data["info"].get("peer")
    columns = [_col("shape", "shape"), _col("mode", "mode"), _col("whole_process_s", "whole process s", ".1f"),
               _col("loglikelihood_s", "loglikelihood s", ".1f"), _col("requests_per_s", "requests/s", ",.0f"),
               _col("acc_norm", "acc_norm", ".4f")]
    if peer:
        columns += [_col("peer_whole_process_s", "mamba_ssm wrapper whole s", ".1f"),
                    _col("peer_loglikelihood_s", "mamba_ssm wrapper loglikelihood s", ".1f"),
                    _col("speed_vs_peer_whole", "speed vs wrapper (whole)", "x"),
                    _col("speed_vs_peer_loglikelihood", "speed vs wrapper (loglikelihood)", "x")]
    rows = [{**{c[0]: r.get(c[0]) for c in columns}, "acc_norm": r.get("metrics", {}).get("acc_norm")}
            for r in data["runs"]]
    return {"columns": columns, "rows": rows, "peer": peer}


def summarize_kernels(data: dict) -> dict:
    measured = [r for r in data["rows"] if "peer_status" in r]
    peer = " + ".join(data["meta"].get("peers", [])) if measured else None
    columns = [_col("kernel", "kernel"), _col("shape", "shape"), _col("check", "check vs reference"),
               _col("ms", "ms", ".4f"), _col("gbps", "GB/s", ",.0f"), _col("bound", "bound"),
               _col("share", "share of roofline", "%")]
    if peer:
        columns += [_col("peer", "peer"), _col("peer_ms", "peer ms", ".4f"),
                    _col("peer_share", "peer share of roofline", "%"),
                    _col("speed_vs_peer", "speed vs peer", "x"), _col("peer_check", "peer check")]
    rows = []
    for r in data["rows"]:
        err = r.get("max_rel_err")
        row = {c[0]: r.get(c[0]) for c in columns}
        row["check"] = r["status"] if err is None else f"{r['status']} {err:.1e}"
        if r.get("peer_status"):
            err = r.get("peer_max_rel_err")
            row["peer_check"] = r["peer_status"] if err is None else f"{r['peer_status']} {err:.1e}"
        rows.append(row)
    return {"columns": columns, "rows": rows, "peer": peer}


def summarize_7b(data: dict) -> dict:
    columns = [_col("shape", "shape"), _col("run", "run"), _col("tokens_per_s", "tok/s", ",.0f"),
               _col("roofline_share", "share of bf16 matmul peak", "%"), _col("ms_per_token", "ms/token", ".2f"),
               _col("peak_GiB", "peak GiB", ".1f"), _col("rel_err_vs_ref", "err vs ref", ".1e")]
    rows = []
    for r in data["results"]:
        common = {"shape": r["shape"], "peak_GiB": r.get("peak_GiB"), "rel_err_vs_ref": r.get("rel_err_vs_ref")}
        for f in r["forward"]:
            rows.append({**common, "run": f"forward B={f['batch']} L={f['length']}", "tokens_per_s": f["tokens_per_s"],
                         "roofline_share": f["roofline_share"]})
        for d in r["decode"]:
            rows.append({**common, "run": f"decode batch {d['batch']}{', graphs' if d['cuda_graphs'] else ', eager'}",
                         "ms_per_token": d.get("ms_per_token")})
    return {"columns": columns, "rows": rows, "peer": None}


def summarize_gen_task(data: dict) -> dict:
    columns = [_col("shape", "shape"), _col("model", "model"), _col("whole_process_s", "whole process s", ".1f"),
               _col("generation_s", "generation s", ".2f"), _col("generated_tokens", "generated tokens"),
               _col("tokens_per_s", "tok/s", ",.0f"), _col("same_as_hf", "same answers as hf"),
               _col("same_as_ours", "same answers as ours")]
    peers = [m for m in data.get("models", []) if m != "mamba"]
    return {"columns": columns, "rows": [{c[0]: r.get(c[0]) for c in columns} for r in data["rows"]],
            "peer": ", ".join(peers) or None}


def summarize_memory(data: dict) -> dict:
    columns = [_col("shape", "shape"), _col("length", "length"), _col("tokens", "context tokens"),
               _col("peak_GiB", "peak allocated GiB", ".2f"), _col("eval_seconds", "eval s", ".1f"),
               _col("status", "status")]
    rows = []
    for shape, entry in data["shapes"].items():
        for t in entry["tasks"]:
            peak = (t.get("peak_memory") or {}).get("peak_bytes")
            rows.append({"shape": shape, "length": t["length_name"], "tokens": t.get("context_tokens_max"),
                         "peak_GiB": None if peak is None else peak / 2**30, "eval_seconds": t.get("eval_seconds"),
                         "status": t.get("status")})
    return {"columns": columns, "rows": rows, "peer": None}


SUMMARIES = {"model": summarize_model, "gen": summarize_gen, "kernels": summarize_kernels, "eval": summarize_eval,
             "7b": summarize_7b, "gen-task": summarize_gen_task, "memory": summarize_memory}


# ------------------------------------------------------------------------------- merging and rendering


def merge(records: list[tuple[str, dict]]) -> dict:
    """The latest of each part (by record date, then name), each with its record's GPU, commit and date."""
    merged = {"tests": {}, "measures": {}, "peaks": {}}
    for _, rec in sorted(records, key=lambda item: (item[1]["date"], item[0])):
        where = {k: rec.get(k) for k in ("gpu", "commit", "dirty", "date")}
        for kind in ("tests", "measures"):
            for name, entry in rec.get(kind, {}).items():
                merged[kind][name] = {**entry, **where}
        for gpu, chip in rec.get("peaks", {}).items():
            merged["peaks"][gpu] = {**chip, "date": rec["date"], "commit": rec.get("commit"), "dirty": rec.get("dirty")}
    return merged


def _commit(entry: dict) -> str:
    sha = (entry.get("commit") or "unknown")[:10]
    return sha + ("-dirty" if entry.get("dirty") else "")


def _cell(value, fmt) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if fmt == "x":
        text = f"{value:.2f}x"
    elif fmt == "%":
        text = f"{100 * value:.1f}%"
    elif fmt:
        text = format(value, fmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(merged: dict) -> str:
    """The generated section of docs/performance.md (deterministic: a function of the records alone)."""
    out = ["Generated by `python scripts/gpu_check.py --render` from the records in docs/perf-records/; do not "
           "edit by hand. Each row names the GPU, commit and UTC date of the run that measured it. Peer columns "
           "appear only where the peer ran in the same run; shares divide by the peaks measured on that GPU in that "
           "run.", ""]
    if not any(merged.values()):
        return "\n".join(out + ["No records yet."])
    if merged["peaks"]:
        out += ["### Measured peaks", ""]
        out += _table(["GPU", "bf16 matmul TFLOP/s", "device copy TB/s (read + write)", "commit", "date"],
                      [[gpu, f"{p['matmul_flops'] / 1e12:.0f}", f"{p['copy_bytes_per_s'] / 1e12:.2f}", _commit(p),
                        p["date"][:10]] for gpu, p in sorted(merged["peaks"].items())])
        out.append("")
    if merged["tests"]:
        out += ["### GPU tests", ""]
        groups = [g for g in [*GPU_TESTS, *sorted(set(merged["tests"]) - set(GPU_TESTS))] if g in merged["tests"]]
        out += _table(["group", "status", "passed", "failed", "errors", "skipped", "seconds", "GPU", "commit", "date"],
                      [[g] + [_cell(merged["tests"][g].get(k), None) for k in
                              ("status", "passed", "failed", "errors", "skipped", "seconds", "gpu")]
                       + [_commit(merged["tests"][g]), merged["tests"][g]["date"][:10]] for g in groups])
        out.append("")
        for g in groups:
            t = merged["tests"][g]
            out.append(f"- {g}: `{t['command']}`")
            out += [f"  - failed: `{name}`" for name in t.get("failures", [])]
            out += [f"  - skipped ({n}): {_cell(reason, None)}"
                    for reason, n in sorted(t.get("skip_reasons", {}).items())]
        out.append("")
    names = [m for m in [*BENCHES, *sorted(set(merged["measures"]) - set(BENCHES))] if m in merged["measures"]]
    for name in names:
        m = merged["measures"][name]
        columns = [c for c in m["columns"] if any(r.get(c[0]) is not None for r in m["rows"])]
        peer = f"peer measured in the same run: {m['peer']}" if m.get("peer") else "no peer measured in this run"
        status = f"; exit status {m['returncode']}" if m.get("returncode") else ""
        out += [f"### {m.get('title', name)}", "", f"`{m['command']}`{status}; {peer}.", ""]
        out += _table([c[1] for c in columns] + ["GPU", "commit", "date"],
                      [[_cell(r.get(c[0]), c[2]) for c in columns] + [m["gpu"] or "-", _commit(m), m["date"][:10]]
                       for r in m["rows"]])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_doc(section: str, doc: Path = DOC) -> None:
    """Replace what lies between the markers of ``doc``; the rest of the page is left as it is."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if not doc.is_file():
        text = ("# Performance\n\nThe tables between the markers below are generated. On the GPU machine, "
                "`scripts/gpu_check.py` runs the GPU-only tests and the benchmarks (a few parts per command, "
                "`--only`) and writes a record (JSON) of each run; the records are kept in docs/perf-records/, and "
                "`python scripts/gpu_check.py --render`, run anywhere, rewrites the part between the markers from "
                "them, the latest record of each part winning. The script's docstring gives the exact commands.\n\n"
                f"{block}\n")
    else:
        text = doc.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + f"\n\n{block}\n"
    doc.write_text(text)


def load_records(paths: list[str]) -> list[tuple[str, dict]]:
    return [(Path(p).name, json.loads(Path(p).read_text())) for p in paths]


# ------------------------------------------------------------------------------- preparing (CPU)


def prepare() -> None:
    """The commit stamp and a copy of the data folder under runs/gpu_check/, to carry to the GPU machine."""
    stamp = write_stamp()
    source = Path(os.environ.get("MAMBA_EVAL_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    if PREPARED_DATA.exists():
        shutil.rmtree(PREPARED_DATA)
    shutil.copytree(source, PREPARED_DATA)
    print(f"stamp of {stamp['commit'][:10]} ({len(stamp['files'])} files) and {source} copied under "
          f"{STAMP.parent.relative_to(REPO)}; carry it with .whl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--render", nargs="*", metavar="RECORD",
                      help="render docs/performance.md from these records (default: docs/perf-records/*.json)")
    mode.add_argument("--prepare", action="store_true", help="on the CPU machine: write runs/gpu_check/ to carry")
    ap.add_argument("--only", default="all", help=f"comma-separated parts: {', '.join(PARTS)}, or tests, all")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check/out"), help="where the record and log go")
    ap.add_argument("--budget", type=float, default=570,
                    help="seconds for the whole command, from --since (parts are cut at it)")
    ap.add_argument("--since", type=float, default=None, metavar="EPOCH",
                    help="when the command started (date +%%s; default: now)")
    ap.add_argument("--doc", default=str(DOC), help="the page to render into")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare()
        return 0
    if args.render is not None:
        paths = args.render or sorted(str(p) for p in RECORDS.glob("*.json"))
        write_doc(render(merge(load_records(paths))), Path(args.doc))
        print(f"rendered {len(paths)} records into {args.doc}")
        return 0
    parts = []
    for name in args.only.split(","):
        for part in ALIASES.get(name, [name]):
            if part not in PARTS:
                ap.error(f"unknown part {part!r}; known: {', '.join(PARTS)}, tests, all")
            if part not in parts:
                parts.append(part)
    spent = 0.0 if args.since is None else time.time() - args.since
    return run_parts(parts, Path(args.out), args.budget - spent)


if __name__ == "__main__":
    sys.exit(main())
