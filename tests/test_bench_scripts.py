"""The benchmark scripts' shared parts on the CPU: the peak table behind every share, the stored
figures (never divided by), scripts/gpu_check.py's records (merge, rendering, the GPU test list),
every script's ``--help``, and the toy-size CPU runs of bench_model.py and bench_generate.py."""

from __future__ import annotations

import json
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import anchors  # noqa: E402
import bench_common  # noqa: E402
import gpu_check  # noqa: E402

FAKE_GPU = "Fake GPU 9000"


@pytest.fixture
def fake_peaks(monkeypatch):
    monkeypatch.setattr(bench_common, "PEAKS", {FAKE_GPU: bench_common.Peaks(matmul_flops=100e12,
                                                                             copy_bytes_per_s=2e12)})
    monkeypatch.delenv(bench_common.PEAKS_ENV, raising=False)


# ----------------------------------------------------------------------------- peaks


def test_shares_divide_by_the_peaks_of_the_named_gpu(fake_peaks):
    import bench_kernels

    assert bench_common.matmul_share(25e12, gpu=FAKE_GPU) == pytest.approx(0.25)
    chip = bench_common.peaks(FAKE_GPU)
    # 4 GB at 2 TB/s: 2 ms; 50 GFLOP at 100 TFLOP/s: 0.5 ms; the bytes bind.
    assert bench_kernels.roofline(4e9, 0, 50e9, exp_rate=1e12, chip=chip) == ("bytes", pytest.approx(2.0))
    assert bench_kernels.roofline(1e9, 0, 400e9, exp_rate=1e12, chip=chip) == ("flops", pytest.approx(4.0))


def test_peaks_of_another_gpu_are_never_guessed(fake_peaks):
    with pytest.raises((KeyError, RuntimeError)):
        bench_common.peaks("NVIDIA H200")


def test_peaks_measured_once_are_read_from_the_run_file(monkeypatch, tmp_path):
    path = tmp_path / "peaks.json"
    path.write_text(json.dumps({FAKE_GPU: {"matmul_flops": 7e14, "copy_bytes_per_s": 3e12}}))
    monkeypatch.setattr(bench_common, "PEAKS", {})
    monkeypatch.setenv(bench_common.PEAKS_ENV, str(path))
    assert bench_common.peaks(FAKE_GPU) == bench_common.Peaks(7e14, 3e12)


# ----------------------------------------------------------------------------- stored figures


def test_stored_figures_prefer_the_running_gpus_kind():
    _, source = anchors.stored("gen", ("mamba-130m", 1), "NVIDIA H100 80GB HBM3")
    assert source is anchors.H100
    _, source = anchors.stored("gen", ("mamba-130m", 1), "NVIDIA H200")
    assert source is anchors.H200
    _, source = anchors.stored("kernels", ("add_rmsnorm", "32768 x 2560, fp32 residual"), "NVIDIA H100 80GB HBM3")
    assert source is anchors.H200  # the only machine with kernel figures
    assert anchors.stored("model", ("mamba-130m", 2, 8), None) is None


def test_a_stored_figure_is_shown_labelled_and_never_divided_by(capsys):
    import bench_model

    found, source = anchors.stored("model", ("mamba-130m", 64, 128), "NVIDIA H100 80GB HBM3")
    run = {"batch": 64, "length": 128, "tokens_per_s": 5e5, "roofline_share": 0.1,
           "stored_peer_tokens_per_s": found, "stored_source": source.label}
    bench_model.print_table({"shapes": {"mamba-130m": {"rel_err_vs_ref": 1e-3, "runs": [run]}}}, peer=None)
    out = capsys.readouterr().out
    assert "stored mamba_ssm tok/s" in out and f"{found:.0f}" in out
    assert "speed" not in out
    assert "H100" in out and "2026-12-07" in out and "not measured in this run" in out


# ----------------------------------------------------------------------------- records


def _model_json(peer: bool) -> dict:
    runs = [{"batch": 64, "length": 128, "tokens_per_s": 400000.0, "roofline_share": 0.125},
            {"batch": 1, "length": 16384, "tokens_per_s": 500000.0, "roofline_share": 0.15625}]
    for r in runs:
        if peer:
            r.update(peer_tokens_per_s=320000.0, speed_vs_peer=r["tokens_per_s"] / 320000.0)
        else:  # what bench_model writes without the peer: stored figures, which the page must not show
            r.update(stored_peer_tokens_per_s=409000.0, stored_source=anchors.H200.label)
    return {"peer": "mamba_ssm 2.3.2.post1" if peer else None,
            "shapes": {"mamba-130m": {"rel_err_vs_ref": 0.002, "runs": runs}}}


def _record(date: str, commit: str, measures: dict, tests: dict | None = None) -> dict:
    return {"format": 1, "gpu": FAKE_GPU, "commit": commit, "dirty": False, "date": date,
            "peaks": {FAKE_GPU: {"matmul_flops": 8e14, "copy_bytes_per_s": 3.2e12}},
            "tests": tests or {}, "measures": {name: {"title": name, "command": f"python scripts/bench_{name}.py",
                                                      "returncode": 0, **table} for name, table in measures.items()}}


def _table_lines(text: str, title: str) -> list[str]:
    section = text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_render_without_a_peer_has_no_peer_or_ratio_column():
    record = _record("2026-12-08T10:00:00Z", "0123456789abcdef", {"model": gpu_check.summarize_model(_model_json(False))})
    text = gpu_check.render(gpu_check.merge([("a.json", record)]))
    assert text == gpu_check.render(gpu_check.merge([("a.json", json.loads(json.dumps(record)))]))
    header, rule, *rows = _table_lines(text, "model")
    assert header == "| shape | batch | tok/s | share of bf16 matmul peak | err vs ref | GPU | commit | date |"
    assert rule == "|---|---|---|---|---|---|---|---|"
    assert rows == [f"| mamba-130m | B=64 L=128 | 400,000 | 12.5% | 2.0e-03 | {FAKE_GPU} | 0123456789 | 2026-12-08 |",
                    f"| mamba-130m | B=1 L=16384 | 500,000 | 15.6% | 2.0e-03 | {FAKE_GPU} | 0123456789 | 2026-12-08 |"]
    assert "409" not in text and "no peer measured in this run" in text


def test_render_with_a_peer_measured_in_the_run_shows_it_and_the_ratio():
    record = _record("2026-12-08T10:00:00Z", "0123456789abcdef", {"model": gpu_check.summarize_model(_model_json(True))})
    header, _, first, _ = _table_lines(gpu_check.render(gpu_check.merge([("a.json", record)])), "model")
    assert header.endswith("| mamba_ssm tok/s | speed vs mamba_ssm | GPU | commit | date |")
    assert "| 320,000 | 1.25x |" in first


def test_a_later_partial_record_replaces_only_its_parts():
    tests = {"tests-kernels": {"command": "pytest tests/kernels", "status": "passed", "passed": 10, "failed": 0,
                               "errors": 0, "skipped": 1, "seconds": 12.0, "failures": [],
                               "skip_reasons": {"needs two GPUs": 1}}}
    old = _record("2026-12-08T10:00:00Z", "aaaaaaaaaaaa", {"model": gpu_check.summarize_model(_model_json(False))},
                  tests)
    new = _record("2026-12-09T08:00:00Z", "bbbbbbbbbbbb", {"model": gpu_check.summarize_model(_model_json(True))})
    merged = gpu_check.merge([("new.json", new), ("old.json", old)])  # the order given does not matter
    assert merged["tests"]["tests-kernels"]["commit"] == "aaaaaaaaaaaa"
    assert merged["measures"]["model"]["commit"] == "bbbbbbbbbbbb" and merged["measures"]["model"]["peer"]
    text = gpu_check.render(merged)
    assert "| tests-kernels | passed | 10 | 0 | 0 | 1 | 12.0 |" in text and "skipped (1): needs two GPUs" in text
    assert all("bbbbbbbbbb | 2026-12-09" in row for row in _table_lines(text, "model")[2:])


def test_the_page_outside_the_markers_is_left_alone(tmp_path):
    doc = tmp_path / "performance.md"
    gpu_check.write_doc("first\n", doc)
    created = doc.read_text()
    assert created.startswith("# Performance\n") and f"{gpu_check.BEGIN}\nfirst\n{gpu_check.END}" in created
    doc.write_text("# Performance\n\nprose above\n\n" + created.split("\n\n", 2)[2] + "\nprose below\n")
    gpu_check.write_doc("second\n", doc)
    text = doc.read_text()
    assert "prose above" in text and text.endswith("\nprose below\n") and "first" not in text
    assert f"{gpu_check.BEGIN}\nsecond\n{gpu_check.END}" in text
    other = tmp_path / "other.md"
    other.write_text("# Other\n")
    gpu_check.write_doc("third\n", other)
    assert other.read_text() == f"# Other\n\n{gpu_check.BEGIN}\nthird\n{gpu_check.END}\n"


def test_commit_prefers_a_matching_stamp_to_an_older_git(tmp_path, monkeypatch):
    """On the GPU machine the tree may come with the .git of an older commit: a stamp whose files
    all match names the commit; once a file differs, git decides."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "a.py").write_text("old\n")
    git("init", "-q")
    git("add", "a.py")
    git("commit", "-qm", "old")
    old = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "a.py").write_text("new\n")
    stamp = tmp_path / "stamp.json"
    stamp.write_text(json.dumps({"commit": "f" * 40, "files": {"a.py": bench_common._blob_hash(tmp_path / "a.py")}}))
    monkeypatch.setattr(bench_common, "REPO", tmp_path)
    monkeypatch.setattr(bench_common, "STAMP", stamp)
    assert bench_common.commit() == ("f" * 40, False)
    (tmp_path / "a.py").write_text("newer\n")
    assert bench_common.commit() == (old, True)
    stamp.unlink()
    assert bench_common.commit() == (old, True)


def test_junit_counts_and_reasons(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.a" name="test_ok"/>
      <testcase classname="tests.a" name="test_bad"><failure message="boom"/></testcase>
      <testcase classname="tests.b" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase>
      <testcase classname="tests.b" name="test_err"><error message="fixture"/></testcase>
    </testsuite></testsuites>""")
    assert gpu_check.parse_junit(xml) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                          "failures": ["tests.a::test_bad", "tests.b::test_err"],
                                          "skip_reasons": {"needs a CUDA GPU": 1}}


def test_tests_cut_at_the_budget_still_report_their_failures(tmp_path, monkeypatch, request):
    """A test group stopped at its time budget is interrupted, not killed: pytest's report then
    names the failures found so far."""
    (tmp_path / "test_cut.py").write_text(
        "import time\n\ndef test_fails():\n    assert 1 == 2\n\n"
        "def test_runs_past_the_budget():\n    time.sleep(120)\n")
    monkeypatch.setitem(gpu_check.GPU_TESTS, "cut", [str(tmp_path / "test_cut.py")])
    monkeypatch.setattr(gpu_check, "test_workers", lambda: [])
    # As when started in the background: SIGINT ignored in this process, and so in its children.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    log = tmp_path / "log"
    # The budget leaves a loaded CI machine time to start pytest and run the first test.
    entry = gpu_check.run_tests("cut", {**gpu_check.os.environ, "PYTHONUNBUFFERED": "1"}, log, tmp_path, 20)
    assert entry["status"] == "cut at the time budget", log.read_text()
    assert entry.get("failures") == ["test_cut::test_fails"] and entry["seconds"] < 50, (entry, log.read_text())


def test_every_test_file_with_a_cuda_path_is_in_the_gpu_check():
    tests = Path(__file__).resolve().parent
    listed = [Path(p.split("::")[0]) for paths in gpu_check.GPU_TESTS.values() for p in paths]
    for path in sorted(set(tests.rglob("test_*.py")) - {Path(__file__).resolve()}):
        if "torch.cuda.is_available()" in path.read_text():
            rel = path.relative_to(tests.parent)
            assert any(rel == p or p in rel.parents for p in listed), f"{rel} is not run by scripts/gpu_check.py"
    for path in sorted((tests / "kernels").glob("test_*.py")):  # all of them run at real sizes there
        assert path.relative_to(tests.parent) in listed, f"{path.name} is in no kernel group of scripts/gpu_check.py"


# ----------------------------------------------------------------------------- the scripts themselves


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("bench_*.py") if p.name != "bench_common.py")
                         + ["probe_memory.py", "gpu_check.py", "tune_step_gemm.py"])
def test_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
@pytest.mark.parametrize("script, args, message", [
    ("tune_step_gemm.py", ["--only", "x_proj"], "tune_step_gemm.py needs a CUDA GPU"),
    ("bench_mamba3.py", ["--reference", "."],
     "bench_mamba3.py needs a CUDA GPU (mamba_ssm's Mamba-3 kernels run there only)"),
])
def test_gpu_only_scripts_say_so(script, args, message):
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == message


@pytest.mark.parametrize("script,check", [
    ("bench_model.py", lambda d: d["shapes"]["mamba2-130m"]["runs"][0]["tokens_per_s"] > 0),
    ("bench_generate.py", lambda d: d["results"][0]["eager_ms_per_token"] > 0),
])
def test_tiny_cpu_run(script, check, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), "--tiny", "--shapes", "mamba2-130m", "--json", str(out)]
                          + (["--batches", "2"] if script == "bench_generate.py" else []),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert check(data) and data["peer"] is None and "commit" in data
    assert "speed vs" not in proc.stdout and "stored:" not in proc.stdout  # toy shapes: no peer, no stored figure


def test_hybrid_generation_beside_transformers_generate(tmp_path):
    """bench_generate.py on a transformers-format hybrid (CPU, toy size, fp32): the checkpoint written
    by transformers' class, decoded by our ``generate`` and by transformers' ``generate`` in one run,
    which must give the same greedy tokens."""
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_generate.py"), "--tiny", "--shapes", "tiny-bamba",
                           "--batches", "2", "--work-dir", str(tmp_path / "ckpt"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert data["peer"].startswith("transformers ") and row["peer"] == "transformers"
    assert row["peer_ms_per_token"] > 0 and row["eager_ms_per_token"] > 0
    assert row["same_tokens_as_peer"] is True


def test_generation_task_through_lm_eval_beside_hf(tmp_path, data_dir):
    """bench_gen_task.py on the CPU: the repo's long-answer task through ``lm_eval --model mamba`` and
    ``--model hf`` on the same tensors; both decode every requested token, and in fp32 the two
    independent implementations give the same greedy answers."""
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_gen_task.py"), "--shapes", "tiny", "--device", "cpu",
                           "--dtype", "float32", "--models", "mamba,hf", "--limit", "3", "--max-gen-toks", "12",
                           "--batch-size", "3", "--data-dir", str(data_dir), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"mamba", "hf"}
    for r in rows.values():
        assert r["requests"] == 3 and r["generated_tokens"] == 3 * 12 and r["generation_s"] > 0
    assert rows["mamba"]["same_as_hf"] == "3/3" and rows["hf"]["same_as_ours"] == "3/3"


def test_eval_of_a_transformers_hybrid_beside_hf(tmp_path, data_dir):
    """bench_eval.py on a transformers-format hybrid (CPU, toy size): a checkpoint written by
    transformers' class, scored by ``--model mamba`` and ``--model hf`` in one run, with the same
    accuracy in fp32."""
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_eval.py"), "--shapes", "tiny-bamba", "--device", "cpu",
                           "--dtype", "float32", "--limit", "4", "--batch-size", "4", "--data-dir", str(data_dir),
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    (ours,), (peer,) = data["runs"], data["peer_runs"]
    assert peer["mode"] == "hf" and ours["peer"] == "hf" and ours["requests"] == 16
    for metric in ("acc", "acc_norm"):
        assert ours["metrics"][metric] == peer["metrics"][metric]
