"""lm-eval's task index and prompt templates, cached by ``mamba_eval.harness.task_cache``: the same
index and the same rendered text as lm-eval's own code, rebuilt whenever a file it read changes;
installed by the start-up hook only when ``MAMBA_EVAL_HARNESS_CACHE`` opts in (``mamba-eval``
does), so that a plain lm-eval run of any model executes lm-eval's own code."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import lm_eval.tasks._index as index_module
import lm_eval.tasks._yaml_loader as loader_module
import lm_eval.utils as lm_utils
from mamba_eval.harness import task_cache
from mamba_eval.harness.registration import HARNESS_CACHE_ENV

TaskIndex = index_module.TaskIndex


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty cache folder, files old enough to be trusted, and the wrapper installed (for
    this test only: this process's lm-eval gets its own ``build`` back afterwards)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(task_cache, "RACY_SECONDS", -3600.0)  # files written by the test count as old
    own = TaskIndex.__dict__["build"]
    task_cache.install_index_cache(index_module, loader_module)
    assert getattr(TaskIndex.build, "_mamba_eval_cached", False)
    yield tmp_path / "cache" / "mamba_eval" / "task_index"
    TaskIndex.build = own


def _uncached(paths):
    return TaskIndex.build.__wrapped__(paths)


def _same(a: dict, b: dict) -> bool:
    """Equal indexes, NaN included (``repr`` shows every value's type and dicts' key order)."""
    def norm(index):
        return [(k, e.name, e.kind, type(e.yaml_path), e.yaml_path, repr(e.cfg), sorted(e.tags))
                for k, e in index.items()]
    return norm(a) == norm(b)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _tree(root):
    _write(root / "a" / "_template_yaml", """
        dataset_path: local
        output_type: multiple_choice
        doc_to_choice: "{{choices}}"
        metric_list:
          - metric: acc
    """)
    _write(root / "a" / "one.yaml", """
        include: _template_yaml
        task: t_one
        tag: [tag_x]
        num_fewshot: 0
        doc_to_text: !function utils.doc_to_text
        fewshot_config: {1: first, 2.5: half, false: no_key, null: none_key}
        generation_kwargs: {temperature: 0.0, until: ["\\n", "."], max_gen_toks: 32}
        weird: [.nan, .inf, -0.0, 12345678901234567890, "\\x00d"]
    """)
    _write(root / "a" / "two.yaml", """
        include: _template_yaml
        task: t_two
        tag: tag_x
    """)
    _write(root / "g" / "group.yaml", """
        group: g_all
        task: [t_one, t_two]
        aggregate_metric_list: [{metric: acc, weight_by_size: true}]
    """)


def test_cached_index_equals_lm_eval_index_and_tracks_changes(tmp_path, cache_home):
    root = tmp_path / "tasks"
    _tree(root)
    want = _uncached([root])
    assert {"t_one", "t_two", "g_all", "tag_x"} <= set(want)
    first = TaskIndex.build([root])  # built by lm-eval, stored
    assert _same(first, want) and len(list(cache_home.glob("*.json"))) == 1
    hit = TaskIndex.build([root])  # read back
    assert _same(hit, want)
    cfg = hit["t_one"].cfg
    assert list(cfg["fewshot_config"]) == [1, 2.5, False, None]  # non-string keys and their order
    assert cfg["weird"][0] != cfg["weird"][0] and cfg["weird"][1] == float("inf")
    assert str(cfg["weird"][2]) == "-0.0" and cfg["weird"][3] == 12345678901234567890

    # Reading the cache does not parse YAML; any change to a file the build read does.
    calls = []
    original = loader_module.load_yaml

    def counting(path, *a, **k):
        calls.append(path)
        return original(path, *a, **k)

    loader_module.load_yaml, index_module.load_yaml = counting, counting
    try:
        assert _same(TaskIndex.build([root]), want) and calls == []
        time.sleep(0.01)
        _write(root / "a" / "_template_yaml", """
            dataset_path: other
            output_type: multiple_choice
        """)  # an included file, not a .yaml
        changed = TaskIndex.build([root])
        assert calls and changed["t_one"].cfg["dataset_path"] == "other"
        assert _same(changed, _uncached([root]))
        calls.clear()
        assert _same(TaskIndex.build([root]), changed) and calls == []
        _write(root / "b" / "three.yaml", "task: t_three\ndataset_path: x\n")  # a new file
        assert "t_three" in TaskIndex.build([root])
        (root / "a" / "two.yaml").unlink()  # a removed file
        assert "t_two" not in TaskIndex.build([root])
    finally:
        loader_module.load_yaml, index_module.load_yaml = original, original


def test_warnings_of_the_build_are_logged_again_from_the_cache(tmp_path, cache_home, caplog):
    first, second = tmp_path / "first", tmp_path / "second"
    _tree(first)
    _write(second / "one.yaml", "task: t_one\ndataset_path: override\n")
    _write(second / "dup" / "a.yaml", "task: t_dup\ndataset_path: a\n")
    _write(second / "dup" / "b.yaml", "task: t_dup\ndataset_path: b\n")  # a duplicate within a folder

    def messages():
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.WARNING, logger=index_module.log.name):
        want = _uncached([first, second])
    warned = messages()
    assert any("overrides" in m for m in warned) and any("Duplicate" in m for m in warned)
    for _ in range(2):  # built (and stored) folder by folder, then read back
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=index_module.log.name):
            assert _same(TaskIndex.build([first, second]), want)
        assert messages() == warned
    assert want["t_one"].cfg["dataset_path"] == "override"
    assert len(list(cache_home.glob("*.json"))) == 2  # one per folder


def test_a_malformed_cache_file_is_rebuilt(tmp_path, cache_home):
    root = tmp_path / "tasks"
    _tree(root)
    want = _uncached([root])
    TaskIndex.build([root])
    (stored,) = cache_home.glob("*.json")
    for text in ("{not json", json.dumps({"format": task_cache.FORMAT, "yamls": [], "files": 3}),
                 stored.read_text().replace('"TASK"', '"NO_SUCH_KIND"')):
        stored.write_text(text)
        assert _same(TaskIndex.build([root]), want)
        assert json.loads(stored.read_text())["format"] == task_cache.FORMAT  # written again
        assert _same(TaskIndex.build([root]), want)


def test_values_json_cannot_carry_leave_the_index_uncached(tmp_path, cache_home):
    root = tmp_path / "tasks"
    _write(root / "alias.yaml", """
        task: t_alias
        base: &shared {a: 1}
        copy: *shared
    """)
    _write(root / "date.yaml", "task: t_date\nwhen: 2024-01-02\n")
    want = _uncached([root])
    assert _same(TaskIndex.build([root]), want)
    assert list(cache_home.glob("*.json")) == []
    assert _same(TaskIndex.build([root]), want)


def test_recently_modified_files_are_not_trusted(tmp_path, cache_home, monkeypatch):
    monkeypatch.setattr(task_cache, "RACY_SECONDS", 2.0)
    root = tmp_path / "tasks"
    _tree(root)  # written just now
    assert _same(TaskIndex.build([root]), _uncached([root]))
    assert list(cache_home.glob("*.json")) == []


def test_real_task_index_from_the_cache_equals_lm_eval(cache_home):
    """lm-eval's own 14,000-odd task configs: the index read from the cache is the index."""
    roots = [Path(index_module.__file__).parent]  # what TaskManager indexes by default
    want = _uncached(roots)
    TaskIndex.build(roots)
    stored = list(cache_home.glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["format"] == task_cache.FORMAT
    assert _same(TaskIndex.build(roots), want)


@pytest.fixture
def template_cache():
    """The template cache on lm-eval's Jinja environment, for this test only."""
    env = lm_utils.env
    had_own = "from_string" in vars(env)
    own = env.from_string
    task_cache.install_template_cache(env)
    yield env.from_string
    if had_own:
        env.from_string = own
    else:
        del env.from_string


def test_template_cache_renders_the_same_text(template_cache):
    env = lm_utils.env
    from_string = template_cache
    assert getattr(from_string, "_mamba_eval_cached", False)
    template = "{{ ctx | trim }}: {{ endings[label] }}{% if x %} x{% endif %}"
    doc = {"ctx": " a b ", "endings": ["p", "q"], "label": 1, "x": True}
    before = from_string.cache_info().hits
    assert lm_utils.apply_template(template, doc) == "a b: q x"
    assert lm_utils.apply_template(template, {**doc, "x": False, "label": 0}) == "a b: p"
    assert from_string.cache_info().hits >= before + 1
    assert env.from_string(template) is env.from_string(template)
    # Calls with their own globals are not cached (and see those globals).
    assert env.from_string("{{ g }}", globals={"g": "own"}).render() == "own"
    uncached = from_string.__wrapped__(template)
    assert uncached.render(**doc) == env.from_string(template).render(**doc)


PATCHED = """
    import sys
    import lm_eval.tasks._index as ix, lm_eval.utils as u
    import lm_eval.tasks
    print(getattr(ix.TaskIndex.build, "_mamba_eval_cached", False),
          getattr(u.env.from_string, "_mamba_eval_cached", False))
"""


def _run(args, tmp_path, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("MAMBA_EVAL_DISABLE_HOOK", HARNESS_CACHE_ENV)}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env_overrides)
    return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value, installed", [(None, False), ("0", False), ("1", True), ("true", True)])
def test_the_hook_installs_the_caches_only_when_asked(value, installed, tmp_path):
    env = {} if value is None else {HARNESS_CACHE_ENV: value}
    proc = _run([sys.executable, "-c", textwrap.dedent(PATCHED)], tmp_path, **env)
    assert proc.stdout.split() == [str(installed)] * 2, proc.stderr


# Runs lm-eval's command line as its console script does, then looks at what ran: lm-eval's own
# functions, and nothing of mamba-eval beyond the start-up hook.
CLI_THEN_INSPECT = """
    import sys
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", "run", *sys.argv[1:]]
    try:
        cli_evaluate()
    except SystemExit as exc:
        assert not exc.code, exc.code
    import jinja2, lm_eval.tasks._index as ix, lm_eval.tasks._yaml_loader as yl, lm_eval.utils as u
    assert ix.TaskIndex.__dict__["build"].__func__.__module__ == "lm_eval.tasks._index"
    assert "from_string" not in vars(u.env) and type(u.env).from_string is jinja2.Environment.from_string
    assert ix.load_yaml is yl.load_yaml and yl.load_yaml.__module__ == "lm_eval.tasks._yaml_loader"
    assert sys.excepthook is sys.__excepthook__
    ours = sorted(m for m in sys.modules if m == "mamba_eval" or m.startswith("mamba_eval."))
    print("imported:", *ours)
"""


def _yes_no_task(folder: Path) -> Path:
    data = folder / "data.jsonl"
    data.write_text(json.dumps({"q": "Is ice cold?", "choices": ["yes", "no"], "label": 0}) + "\n")
    tasks = folder / "tasks"
    _write(tasks / "yes_no.yaml", f"""
        task: cache_test_yes_no
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {data}}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list: [{{metric: acc}}]
    """)
    return tasks


def test_plain_lm_eval_of_another_model_runs_lm_evals_own_code(tmp_path):
    """``lm_eval run --model dummy``: nothing of lm-eval replaced, no cache written, and of
    mamba-eval only the hook that registers ``mamba`` and the probe tasks is imported."""
    tasks = _yes_no_task(tmp_path)
    args = ["--model", "dummy", "--tasks", "cache_test_yes_no", "--include_path", str(tasks)]
    proc = _run([sys.executable, "-c", textwrap.dedent(CLI_THEN_INSPECT), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (imported,) = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("imported:")]
    assert imported == ["mamba_eval", "mamba_eval.harness", "mamba_eval.harness.registration"]
    assert not (tmp_path / "xdg" / "mamba_eval").exists()


def test_mamba_eval_run_caches_the_task_index(tmp_path):
    """``mamba-eval run`` opts in: the same evaluation stores lm-eval's task index."""
    tasks = _yes_no_task(tmp_path)
    script = Path(sys.executable).parent / "mamba-eval"
    proc = _run([str(script), "run", "--model", "dummy", "--tasks", "cache_test_yes_no", "--include_path",
                 str(tasks), "--data-dir", ""], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "xdg" / "mamba_eval" / "task_index").glob("*.json"))  # lm-eval's own folder
