"""``mamba`` is an lm-eval model with no user import, in every import order and install mode.

The fast tests run fresh interpreters of the environment running pytest, where mamba-eval
must be installed (``pip install -e .``). The slow test installs the working tree into new
virtual environments, regular and editable, and checks the real class, the console script,
the uninstall and a stale ``.pth`` left behind; after the regular install it also runs module
mains, imports and a ``mamba-eval batch`` (whose worker is ``python -m ...``) from the source
folder, where Python imports the checkout's ``mamba_eval`` instead of the installed one.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PTH_NAME = "mamba_eval_hook.pth"
TARGET = "mamba_eval.harness.lm:MambaLM"


_CLEARED_ENV = ("MAMBA_EVAL_DISABLE_HOOK", "MAMBA_EVAL_HOOK_DEBUG", "PYTHONPATH")


def _python(code: str, python: str = sys.executable, cwd: Path | None = None, env: dict | None = None):
    """Run ``code`` in a fresh interpreter; fail with its output if it does not exit 0."""
    full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    full_env.update(env or {})
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module", autouse=True)
def hook_installed():
    """The interpreter under test must carry the installed hook, or nothing here means anything."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    if not any((Path(d) / PTH_NAME).is_file() for d in dirs):
        pytest.fail(f"{PTH_NAME} is not installed for {sys.executable}; run `pip install -e {REPO_ROOT}`")


# Each snippet runs in a new interpreter, so each sees its own import order.
IMPORT_ORDERS = {
    "registry first, then get_model('hf')": """
        import lm_eval.api.registry as r
        assert r.get_model("hf").__name__ == "HFLM"
        assert "mamba" in r.model_registry
    """,
    "lm_eval.models first": """
        import lm_eval.models
        import lm_eval.api.registry as r
        assert "mamba" in r.model_registry and "dummy" in r.model_registry
        assert r.get_model("dummy").__name__ == "DummyLM"
    """,
    "get_model('dummy'), then mamba is there": """
        from lm_eval.api.registry import get_model, model_registry
        assert get_model("dummy").__name__ == "DummyLM"
        assert dict(model_registry.items())["mamba"] == "%s"
    """ % TARGET,
    # Stock lm-eval 0.4.13 would now hide the built-ins: get_model imports them only while
    # the registry is empty. The hook registers them as soon as the registry exists.
    "a user model registered before any lookup": """
        import lm_eval.api.registry as r
        r.model_registry.register("user-model", target="user_pkg:UserLM")
        assert r.get_model("dummy").__name__ == "DummyLM"
        assert "mamba" in r.model_registry and "user-model" in r.model_registry
    """,
    "the evaluator module first": """
        import lm_eval.evaluator
        from lm_eval.api.registry import model_registry
        assert "mamba" in model_registry and "hf" in model_registry
    """,
    "the hook restores the real loaders and removes its finder": """
        import sys
        import lm_eval.api.registry as r
        import lm_eval.models as m
        import lm_eval.tasks.manager as t
        for mod in (r, m, t):
            assert type(mod.__loader__).__name__ == "SourceFileLoader", mod.__loader__
            assert mod.__spec__.loader is mod.__loader__
        assert not [f for f in sys.meta_path
                    if type(f).__module__ == "mamba_eval.harness.registration" or "MambaEval" in type(f).__name__]
    """,
}


@pytest.mark.parametrize("code", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS.keys())
def test_mamba_registered_beside_builtins(code, tmp_path):
    _python(code, cwd=tmp_path)


# The probe tasks are indexed beside the built-in tasks, under every import order.
PROBE_TASKS = {
    "lm_eval.tasks first": """
        from lm_eval.tasks import TaskManager
        tm = TaskManager()
        assert "mamba_passkey_16k" in tm.all_tasks and "hellaswag" in tm.all_tasks
        assert "mamba_mqar" in tm.all_groups
        assert tm.include_path is None
        import lm_eval.api.registry as r
        assert "mamba" in r.model_registry
    """,
    "the registry first": """
        import lm_eval.api.registry as r
        from lm_eval.tasks import TaskManager
        assert "mamba_ppl_position_16k" in TaskManager().all_tasks and "mamba" in r.model_registry
    """,
    "the caller's include_path wins and is kept": """
        import pathlib
        from lm_eval.tasks import TaskManager
        own = pathlib.Path("own"); own.mkdir()
        (own / "mine.yaml").write_text("task: mamba_passkey_1k\\ndataset_path: json\\noutput_type: loglikelihood\\n")
        tm = TaskManager(include_path=str(own))
        assert tm.include_path == str(own)
        assert tm._index["mamba_passkey_1k"].yaml_path.resolve() == (own / "mine.yaml").resolve()
        assert "mamba_passkey_4k" in tm.all_tasks
    """,
    "not without the built-ins": """
        import pathlib
        from lm_eval.tasks import TaskManager
        empty = pathlib.Path("empty"); empty.mkdir()
        assert "mamba_passkey_1k" not in TaskManager(include_path=str(empty), include_defaults=False).all_tasks
    """,
}


@pytest.mark.parametrize("code", PROBE_TASKS.values(), ids=PROBE_TASKS.keys())
def test_probe_tasks_indexed_beside_builtins(code, tmp_path):
    _python(code, cwd=tmp_path)


STARTUP = """
    import sys
    stubs = [f for f in sys.meta_path if type(f).__name__ == "MambaEvalStartupHook"]
    print(len(stubs), "mamba_eval" in sys.modules, "torch" in sys.modules, "lm_eval" in sys.modules)
"""


def test_startup_installs_one_stub_and_imports_nothing(tmp_path):
    """Start-up only adds the .pth's stub finder (once, though a venv's .pth may run twice)."""
    proc = _python(STARTUP, cwd=tmp_path)
    assert proc.stdout.split() == ["1", "False", "False", "False"]
    assert proc.stderr == ""


def test_hook_can_be_disabled(tmp_path):
    proc = _python(
        """
        import lm_eval.api.registry as r
        from lm_eval.tasks import TaskManager
        assert r.get_model("dummy").__name__ == "DummyLM"
        print("mamba" in r.model_registry, "mamba_passkey_1k" in TaskManager().all_tasks)
        """,
        cwd=tmp_path,
        env={"MAMBA_EVAL_DISABLE_HOOK": "1"},
    )
    assert proc.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ fresh environments


def _copy_tree(dest: Path) -> Path:
    """The working tree without VCS data, virtual environments or build output."""
    ignore = shutil.ignore_patterns(
        ".git", ".ci-venv", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
        ".pytest_cache", "runs", ".whl", ".device",
    )
    shutil.copytree(REPO_ROOT, dest, ignore=ignore, symlinks=True)
    return dest


def _dependency_dir(dest: Path) -> Path:
    """This environment's site-packages as symlinks, minus mamba-eval and every ``.pth``.

    New environments reach the dependencies through a plain path line (which only extends
    ``sys.path``; ``.pth`` files in that folder are not processed), and cannot pick up this
    environment's own copy of mamba-eval.
    """
    dest.mkdir()
    sources = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for source in dict.fromkeys(Path(s).resolve() for s in sources):
        if not source.is_dir():
            continue
        for entry in source.iterdir():
            name = entry.name
            if "mamba_eval" in name or name.endswith(".pth") or name == "__pycache__":
                continue
            if not (dest / name).exists():
                (dest / name).symlink_to(entry)
    return dest


def _new_env(root: Path, deps: Path) -> tuple[str, Path]:
    venv.EnvBuilder(with_pip=False).create(root)
    python = str(root / "bin" / "python")
    purelib = _python("import sysconfig; print(sysconfig.get_paths()['purelib'])", python).stdout.strip()
    Path(purelib, "_test_dependencies.pth").write_text(f"{deps}\n")
    return python, Path(purelib)


def _pip(python: str, *args: str) -> None:
    proc = subprocess.run(
        [python, "-m", "pip", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def _require_setuptools() -> None:
    """The builds run without isolation on this environment's setuptools (the test extra)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("setuptools")
    except PackageNotFoundError:
        found = "none"
    major, minor = (int(x) for x in (found.split(".") + ["0", "0"])[:2]) if found[0].isdigit() else (0, 0)
    if (major, minor) < (70, 1):
        pytest.fail(f"setuptools>=70.1 is needed to build mamba-eval here, found {found}; "
                    "install the test extra: pip install -e '.[test]'")


CHECK_INSTALLED = """
    import sys
    stubs = [f for f in sys.meta_path if type(f).__name__ == "MambaEvalStartupHook"]
    print("startup", len(stubs), "mamba_eval" in sys.modules, "torch" in sys.modules)
    import lm_eval.api.registry as r
    cls = r.get_model("mamba")
    print("class", cls.__module__, cls.__name__)
    print("hf", r.get_model("hf").__name__)
    import mamba_eval
    print("file", mamba_eval.__file__)
"""


def _check_runs_from_the_checkout(python: str, src: Path, work: Path) -> None:
    """With a regular install, run from the repository folder: ``-m`` and ``-c`` put that folder
    first on ``sys.path``, so the checkout's ``mamba_eval`` is imported (it has no ``kernels``
    or ``tasks`` sub-folder; ``mamba_eval/__init__.py`` maps the top-level ones)."""
    from mamba_eval.commands.demo import DEMO_TASK, build_demo

    where = _python(
        """
        import mamba_eval, mamba_eval.kernels, mamba_eval.tasks
        for module in (mamba_eval, mamba_eval.kernels, mamba_eval.tasks):
            print(module.__name__, module.__file__)
        """,
        python, cwd=src,
    ).stdout.split()
    assert {name: Path(file).resolve() for name, file in zip(where[::2], where[1::2])} == {
        "mamba_eval": (src / "mamba_eval" / "__init__.py").resolve(),
        "mamba_eval.kernels": (src / "kernels" / "__init__.py").resolve(),
        "mamba_eval.tasks": (src / "tasks" / "__init__.py").resolve(),
    }
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    offline = subprocess.run([python, "-m", "mamba_eval.harness.offline", "--help"], cwd=src, env=env,
                             capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0 and offline.stdout.startswith("usage: "), offline.stderr

    demo = build_demo(work / "demo")
    out = work / "batch"
    batch = subprocess.run(
        [str(Path(python).parent / "mamba-eval"), "batch", "--output", str(out), "--checkpoints", str(demo["model"]),
         "--tasks", DEMO_TASK, "--include_path", str(demo["tasks"]), "--data-dir", "", "--gpus", "none",
         "--workers", "1", "--limit", "2", "--batch_size", "2", "--device", "cpu"],
        cwd=src, env=env, capture_output=True, text=True, timeout=600,
    )
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in out.rglob("*.log"))
    assert batch.returncode == 0, f"{batch.stdout}\n{batch.stderr}\nworker logs:\n{logs}"
    (result,) = out.glob(f"*/{DEMO_TASK}.json")
    assert json.loads(result.read_text())["results"][DEMO_TASK]["alias"] == DEMO_TASK


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_fresh_install(editable, tmp_path_factory):
    _require_setuptools()
    work = tmp_path_factory.mktemp("regular" if not editable else "editable")
    src = _copy_tree(work / "src")
    python, purelib = _new_env(work / "env", _dependency_dir(work / "deps"))

    # Control: the new environment does not see this one's mamba-eval or its hook.
    before = _python(
        """
        import sys, importlib.util
        import lm_eval.api.registry as r
        r.get_model("dummy")
        print("mamba" in r.model_registry, importlib.util.find_spec("mamba_eval") is None)
        """,
        python, cwd=work,
    )
    assert before.stdout.split() == ["False", "True"]

    _pip(python, "install", "--no-deps", "--no-build-isolation", "--no-index", *(["-e"] if editable else []), str(src))
    assert (purelib / PTH_NAME).is_file()

    lines = dict(line.split(" ", 1) for line in _python(CHECK_INSTALLED, python, cwd=work).stdout.splitlines())
    assert lines["startup"] == "1 False False"
    assert lines["class"] == "mamba_eval.harness.lm MambaLM"
    assert lines["hf"] == "HFLM"
    expected_home = src if editable else purelib
    assert Path(lines["file"]).resolve().is_relative_to(expected_home.resolve()), lines["file"]

    script = Path(python).parent / "mamba-eval"
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("mamba-eval "), version
    if not editable:
        _check_runs_from_the_checkout(python, src, work)

    # pip uninstall removes the hook (it is listed in the wheel's RECORD) ...
    pth_text = (purelib / PTH_NAME).read_text()
    _pip(python, "uninstall", "-y", "mamba-eval")
    assert not (purelib / PTH_NAME).exists()
    assert not [p.name for p in purelib.iterdir() if "mamba_eval" in p.name]

    # ... and a stale copy left behind by other means fails silently.
    (purelib / PTH_NAME).write_text(pth_text)
    stale = _python("import lm_eval.api.registry as r; r.get_model('dummy'); print('mamba' in r.model_registry)",
                    python, cwd=work)
    assert stale.stdout.split() == ["False"]
    assert stale.stderr == ""
    quiet = _python("pass", python, cwd=work)
    assert quiet.stderr == ""
