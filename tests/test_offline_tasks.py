"""Offline mirrors of the stock lm-eval tasks (mamba_eval.harness.offline), on the real data folder.

The reference for "same task logic" is the stock task itself: its YAML, loaded by lm-eval
from the installed package, with ``datasets.load_dataset`` answering its hub dataset with rows
in the hub schema taken from the data folder. Both tasks must build the same requests for the
first document and carry the same config apart from where the data comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import yaml

from helpers_data import data_dir as shared_data_dir
from mamba_eval.harness import offline
from mamba_eval.harness.offline import offline_task_names, prepare_offline_tasks

REPO_ROOT = Path(__file__).resolve().parents[1]

# Document counts of the evaluated splits (hub dataset cards; wikitext-2 has 62 test articles).
EXPECTED_DOCS = {
    "hellaswag": 10042,
    "piqa": 1838,
    "lambada_openai": 5153,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "winogrande": 1267,
    "openbookqa": 500,
    "wikitext": 62,
}
# Metric names of the stock task YAMLs of lm-eval 0.4.13.
EXPECTED_METRICS = {
    "hellaswag": {"acc", "acc_norm"},
    "piqa": {"acc", "acc_norm"},
    "lambada_openai": {"perplexity", "acc"},
    "arc_easy": {"acc", "acc_norm"},
    "arc_challenge": {"acc", "acc_norm"},
    "winogrande": {"acc"},
    "openbookqa": {"acc", "acc_norm"},
    "wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}
# Config keys that say where the data comes from; everything else must equal the stock config.
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split", "metadata"}
# Published MD5 of the original WikiText-2 raw test file (llama.cpp scripts/get-wikitext-2.sh).
WIKI_TEST_RAW_MD5 = "7c0137fc034ddbc56a296bce31b4f7fb"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"data folder not found: {path} (set MAMBA_EVAL_DATA_DIR)")
    return path.resolve()


@pytest.fixture(scope="module")
def no_network(tmp_path_factory):
    """Hub offline switches on, an empty datasets cache, and any socket connection refused."""
    import datasets.config
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        # datasets and huggingface_hub read the variables at import time, maybe before this ran.
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def include_path(data_dir, tmp_path_factory) -> Path:
    return prepare_offline_tasks(data_dir, tmp_path_factory.mktemp("offline_cache"))


@pytest.fixture(scope="module")
def offline_tm(include_path, no_network):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path))


@pytest.fixture(scope="module")
def offline_tasks(offline_tm, no_network):
    return offline_tm.load(offline_task_names())["tasks"]


@pytest.fixture(scope="module")
def stock_tm(no_network):
    """Builds stock tasks from their YAML paths; needs no index of its own."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def _hub_rows(task: str, data_dir: Path, include_path: Path, n: int = 3) -> list[dict]:
    """The first ``n`` rows of ``task``'s evaluated split in the hub dataset's schema."""

    def jsonl(path: Path) -> list[dict]:
        with path.open(encoding="utf-8") as fh:
            return [json.loads(next(fh)) for _ in range(n)]

    files = {
        "hellaswag": "hellaswag/hellaswag_val.jsonl",
        "lambada_openai": "lambada_openai/lambada_test.jsonl",
        "arc_easy": "arc/ARC-Easy_test.jsonl",
        "arc_challenge": "arc/ARC-Challenge_test.jsonl",
        "winogrande": "winogrande/winogrande_xl_validation.jsonl",
        "openbookqa": "openbookqa/openbookqa_main_test.jsonl",
    }
    if task in files:
        return jsonl(data_dir / files[task])
    if task == "piqa":  # the hub's piqa rows are the original rows plus their label
        labels = (data_dir / "piqa/valid-labels.lst").read_text().split()
        return [{**row, "label": int(label)} for row, label in zip(jsonl(data_dir / "piqa/valid.jsonl"), labels)]
    if task == "wikitext":  # the converted pages; test_wikitext_pages_rebuild_the_original checks them
        return jsonl(include_path / "data/wikitext/test.jsonl")
    raise KeyError(task)


def _stock_task(task: str, stock_tm, rows: list[dict], monkeypatch):
    """Build the stock task from lm-eval's own YAML, its hub dataset answered by ``rows``."""
    import datasets

    real_load = datasets.load_dataset

    def fake_load(path, name=None, **kwargs):
        if path == "json":
            return real_load(path, name=name, **kwargs)
        split = datasets.Dataset.from_list(rows)
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})

    stock_yaml = offline._stock_tasks_dir() / offline._load_layout()[task].stock
    with monkeypatch.context() as mp:
        mp.setattr(datasets, "load_dataset", fake_load)
        return stock_tm.load([str(stock_yaml)])["tasks"][task]


def _eval_split(task) -> str:
    return task.config.test_split if task.has_test_docs() else task.config.validation_split


def _first_requests(task) -> list[tuple]:
    task.build_all_requests(limit=1, rank=0, world_size=1)
    return [(inst.request_type, inst.arguments, inst.doc) for inst in task.instances]


def test_task_names():
    assert offline_task_names() == list(EXPECTED_DOCS)


def test_all_tasks_load_from_the_include_path(offline_tasks, include_path):
    assert set(offline_tasks) == set(EXPECTED_DOCS)
    for name, task in offline_tasks.items():
        assert task.config.dataset_path == "json", name
        assert Path(task.config.metadata["config_source"]).parent == include_path, name


@pytest.mark.parametrize("name", list(EXPECTED_DOCS))
def test_doc_count(offline_tasks, name):
    assert len(offline_tasks[name].eval_docs) == EXPECTED_DOCS[name]


@pytest.mark.parametrize("name", list(EXPECTED_DOCS))
def test_same_logic_as_stock_task(name, offline_tasks, stock_tm, data_dir, include_path, monkeypatch):
    ours = offline_tasks[name]
    stock = _stock_task(name, stock_tm, _hub_rows(name, data_dir, include_path), monkeypatch)

    assert _eval_split(ours) == _eval_split(stock)
    assert _first_requests(ours) == _first_requests(stock)
    ours_cfg = {k: v for k, v in ours.config.to_dict().items() if k not in DATA_KEYS}
    stock_cfg = {k: v for k, v in stock.config.to_dict().items() if k not in DATA_KEYS}
    assert ours_cfg == stock_cfg
    assert ours.config.metadata["version"] == stock.config.metadata["version"]
    assert set(ours.aggregation()) == set(stock.aggregation()) == EXPECTED_METRICS[name]
    assert ours.higher_is_better() == stock.higher_is_better()


def test_stock_tags_resolve_to_offline_tasks(offline_tm, include_path):
    from lm_eval.tasks import get_task_dict
    from lm_eval.tasks._index import Kind, TaskIndex

    # The include path declares tasks only, so every tag entry of the merged index is the stock
    # one, with all its members (a tag declared there would replace the stock entry) ...
    assert {entry.kind for entry in TaskIndex.build([include_path]).values()} == {Kind.TASK}
    assert {"arc_easy", "arc_challenge"} <= offline_tm.task_index["ai2_arc"].tags
    assert {"lambada_openai", "lambada_standard"} <= offline_tm.task_index["lambada"].tags
    assert "hellaswag" in offline_tm.task_index["multiple_choice"].tags
    assert len(offline_tm.task_index["multiple_choice"].tags) > 1
    # ... and the mirrored members are built from the offline configs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        task_dict = get_task_dict(["ai2_arc"], offline_tm)
    assert set(task_dict) == {"arc_easy", "arc_challenge"}
    for task in task_dict.values():
        assert Path(task.config.metadata["config_source"]).parent == include_path


def test_only_the_offline_overrides_are_silent(include_path, tmp_path, no_network):
    """lm-eval warns when a task config replaces another of the same name. The offline mirrors
    replacing their stock tasks are silent (the start-up hook installs the filter with lm-eval's
    task manager); any other replacement still warns: a folder of one's own replacing a stock
    task, or an offline one."""
    import logging

    from lm_eval.tasks import TaskManager

    stock = offline._stock_tasks_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, stock_yaml in (("sciq", stock / "sciq" / "sciq.yaml"), ("piqa", stock / "piqa" / "piqa.yaml")):
        (mine / f"{name}.yaml").write_text(f"include: {stock_yaml}\ntask: {name}\n")

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    index_log = logging.getLogger("lm_eval.tasks._index")
    index_log.addHandler(handler)
    try:
        TaskManager(include_path=[str(include_path), str(mine)])
    finally:
        index_log.removeHandler(handler)
    overrides = {}
    for record in records:
        message = record.getMessage()
        if "overrides existing task" in message:
            overrides[message.split("'")[1]] = message
    assert set(overrides) == {"sciq", "piqa"}, overrides
    assert str(mine / "piqa.yaml") in overrides["piqa"] and str(include_path / "piqa.yaml") in overrides["piqa"]


def test_wikitext_pages_rebuild_the_original(include_path):
    with (include_path / "data/wikitext/test.jsonl").open(encoding="utf-8") as fh:
        pages = [json.loads(line)["page"] for line in fh]
    assert len(pages) == 62
    # The raw file opens with a blank line, which forms no page; the pages are the rest, in order.
    raw = " \n" + "\n".join(pages)
    assert hashlib.md5(raw.encode("utf-8")).hexdigest() == WIKI_TEST_RAW_MD5
    # Each page opens with its article's title line (" = Title = ") and holds no other.
    for page in pages:
        titles = [
            line
            for line in page.split("\n")
            if line.startswith(" = ") and line.endswith(" = ") and not line.startswith(" = = ")
        ]
        assert titles == [page.split("\n")[0]]
    assert pages[0].startswith(" = Robert Boulter = \n")


# --------------------------------------------------------------------------- errors and cache


def _linked_copy(data_dir: Path, dest: Path, skip: set[str] = frozenset()) -> Path:
    """A data folder of symlinks to every file the layout names, except ``skip`` (its folders exist)."""
    for task in offline._load_layout().values():
        for src in task.splits:
            for rel in src.files:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                if rel not in skip and not (dest / rel).exists():
                    (dest / rel).symlink_to(data_dir / rel)
    return dest


def test_missing_data_dir_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="offline data folder not found") as err:
        prepare_offline_tasks(missing, tmp_path / "cache")
    assert str(missing) in str(err.value)


@pytest.mark.parametrize(
    "rel, task", [("piqa/valid-labels.lst", "piqa"), ("wikitext/wikitext-2-raw-v1_test.jsonl", "wikitext")]
)
def test_missing_file_is_named(data_dir, tmp_path, rel, task):
    folder = _linked_copy(data_dir, tmp_path / "data", skip={rel})
    with pytest.raises(FileNotFoundError) as err:
        prepare_offline_tasks(folder, tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and rel in message and task in message
    assert not (tmp_path / "cache").exists()


def test_optional_validation_files_may_be_missing(data_dir, tmp_path):
    optional = {
        "arc/ARC-Easy_validation.hf.jsonl",
        "arc/ARC-Challenge_validation.hf.jsonl",
        "openbookqa/openbookqa_main_validation.hf.jsonl",
    }
    with_all = yaml.safe_load((prepare_offline_tasks(_linked_copy(data_dir, tmp_path / "a"), tmp_path / "c") / "arc_easy.yaml").read_text())
    without = yaml.safe_load((prepare_offline_tasks(_linked_copy(data_dir, tmp_path / "b", optional), tmp_path / "c") / "arc_easy.yaml").read_text())
    assert with_all["validation_split"] == "validation" and with_all["test_split"] == "test"
    assert without["validation_split"] is None and without["test_split"] == "test"
    assert set(without["dataset_kwargs"]["data_files"]) == {"test"}


def test_piqa_label_count_mismatch(data_dir, tmp_path):
    folder = _linked_copy(data_dir, tmp_path / "data", skip={"piqa/valid-labels.lst"})
    labels = (data_dir / "piqa/valid-labels.lst").read_text().splitlines()
    (folder / "piqa/valid-labels.lst").write_text("\n".join(labels[:-1]) + "\n")
    with pytest.raises(ValueError, match="1837 labels but .* 1838 rows"):
        prepare_offline_tasks(folder, tmp_path / "cache")


def test_wikitext_rows_must_rebuild_the_original(data_dir, tmp_path):
    rel = "wikitext/wikitext-2-raw-v1_test.jsonl"
    folder = _linked_copy(data_dir, tmp_path / "data", skip={rel})
    lines = (data_dir / rel).read_text(encoding="utf-8").splitlines()
    (folder / rel).write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="do not rebuild the original WikiText-2"):
        prepare_offline_tasks(folder, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no final folder, no temporary one


def test_cache_is_reused_and_keyed_on_the_files(data_dir, tmp_path):
    rel = "winogrande/winogrande_xl_validation.jsonl"
    folder = _linked_copy(data_dir, tmp_path / "data", skip={rel})
    shutil.copyfile(data_dir / rel, folder / rel)
    first = prepare_offline_tasks(folder, tmp_path / "cache")
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_offline_tasks(folder, tmp_path / "cache") == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp

    st = (folder / rel).stat()
    os.utime(folder / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = prepare_offline_tasks(folder, tmp_path / "cache")
    assert second != first and (second / "manifest.json").is_file()


def test_interrupted_build_leaves_no_cache(data_dir, tmp_path, monkeypatch):
    def interrupted(sources, out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(offline._CONVERTERS, "wikitext_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_offline_tasks(data_dir, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_data_dir_from_env(monkeypatch, tmp_path):
    """The folder ``python -m mamba_eval.harness.offline`` reads when none is given."""
    from mamba_eval.utils import data_dir_from_env

    monkeypatch.delenv("MAMBA_EVAL_DATA_DIR", raising=False)
    assert data_dir_from_env() is None
    monkeypatch.setenv("MAMBA_EVAL_DATA_DIR", "")
    assert data_dir_from_env() is None
    monkeypatch.setenv("MAMBA_EVAL_DATA_DIR", str(tmp_path))
    assert data_dir_from_env() == tmp_path


def test_readme_documents_every_file():
    readme = (REPO_ROOT / "tasks" / "README.md").read_text(encoding="utf-8")
    for task in offline._load_layout().values():
        for src in task.splits:
            for rel in src.files:
                assert f"`{rel}`" in readme, rel
