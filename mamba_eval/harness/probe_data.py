"""Long-context probe tasks for lm-eval: their configs, and the data generated at load time from a
fixed seed, sized in model tokens.

Three probe families, each an lm-eval task per context length (configs in ``tasks/probes/``,
written by :func:`shipped_task_configs`; ``python -m mamba_eval.harness.probe_data --write DIR``).
lm-eval calls each family's ``*_dataset`` function through ``custom_dataset: !function
mamba_eval.harness.probe_<family>.<fn>`` with the task's ``metadata`` merged with the run's
``--model_args`` (and ``--metadata``), so the data is built with the tokenizer of the model under
test. Nothing is downloaded and no data file is shipped.

- :mod:`~mamba_eval.harness.probe_passkey`: passkey retrieval, by likelihood and by generation;
- :mod:`~mamba_eval.harness.probe_mqar`: multi-query associative recall;
- :mod:`~mamba_eval.harness.probe_ppl`: loss by position in windows of a long text;
- :mod:`~mamba_eval.harness.probe_common`: lengths in model tokens, the tokenizer, determinism
  and versions, the max_length check, shared by the three;
- this module: task names, the task configs, and the shipped ``tasks/probes`` folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mamba_eval.errors import MambaEvalError
from mamba_eval.harness.probe_common import DEFAULT_SEED, PROBE_DATA_VERSION, length_name, parse_length
from mamba_eval.harness.probe_mqar import MQAR_PAIRS, mqar_dataset
from mamba_eval.harness.probe_passkey import (
    PASSKEY_CANDIDATES,
    PASSKEY_DEPTHS,
    PASSKEY_GEN_TOKENS,
    depth_label,
    parse_depths,
    passkey_dataset,
    passkey_gen_results,
    passkey_mc_results,
)
from mamba_eval.harness.probe_ppl import (
    bucket_name,
    position_buckets,
    ppl_position_dataset,
    ppl_position_results,
    token_loss,
)
from mamba_eval.utils import atomic_write

__all__ = [
    "FAMILIES",
    "HEADER",
    "default_samples",
    "include_path",
    "render_yaml",
    "required_max_length",
    "shipped_task_configs",
    "task_config",
    "task_name",
    "write_task_configs",
]


# --------------------------------------------------------------------------- task configs


class _Function(str):
    """A YAML ``!function`` reference (lm-eval imports it when it loads the config)."""


def _function_representer(dumper, value):
    return dumper.represent_scalar("!function", str(value), style="")


def _str_representer(dumper, value):
    style = '"' if any(c in value for c in "\n\r\t") else None  # "\n", not a quoted blank line
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _fn(function) -> _Function:
    # The defining module, never "__main__": the configs are written by python -m too.
    return _Function(f"{function.__module__}.{function.__name__}")


#: family -> (task-name prefix, group name, lengths shipped in tasks/probes/)
FAMILIES = {
    "passkey": ("mamba_passkey", "mamba_passkey", ("1k", "4k", "16k", "64k", "256k", "1m")),
    "passkey_gen": ("mamba_passkey_gen", "mamba_passkey_gen", ("1k", "4k", "16k", "64k", "256k", "1m")),
    "mqar": ("mamba_mqar", "mamba_mqar", ("256", "1k", "4k", "16k", "64k")),
    "ppl": ("mamba_ppl_position", "mamba_ppl_position", ("4k", "16k", "64k")),
}


def task_name(family: str, length: int, pairs: int | None = None) -> str:
    """``mamba_passkey_4k``, ``mamba_passkey_gen_1m``, ``mamba_mqar_4k_p8``, ``mamba_ppl_position_16k``."""
    if family not in FAMILIES:
        raise MambaEvalError(f"unknown probe family {family!r}; known: {', '.join(FAMILIES)}")
    name = f"{FAMILIES[family][0]}_{length_name(length)}"
    if family == "mqar":
        if pairs is None:
            raise MambaEvalError("an MQAR task needs a number of pairs")
        name += f"_p{pairs}"
    return name


def default_samples(family: str, length: int) -> int:
    """Documents per task (passkey: per depth; ppl: windows) unless told otherwise."""
    if family in ("passkey", "passkey_gen"):
        return 10 if length <= 16 * 1024 else 4 if length <= 64 * 1024 else 2
    if family == "mqar":
        return 100 if length <= 4096 else 50 if length <= 16 * 1024 else 20 if length <= 64 * 1024 else 10
    return 8


def task_config(
    family: str,
    length: int,
    *,
    pairs: int | None = None,
    samples: int | None = None,
    depths: Sequence[float] = PASSKEY_DEPTHS,
    num_candidates: int = PASSKEY_CANDIDATES,
    seed: int = DEFAULT_SEED,
    text_file: str | None = None,
    data_dir: str | None = None,
) -> dict:
    """The lm-eval task config (a dict; ``!function`` values as :class:`_Function`)."""
    name = task_name(family, length, pairs)
    samples = samples if samples is not None else default_samples(family, length)
    meta: dict[str, Any] = {"version": PROBE_DATA_VERSION, "context_length": length, "seed": seed}
    base: dict[str, Any] = {"task": name, "dataset_path": "", "test_split": "test"}
    if family in ("passkey", "passkey_gen"):
        depths = parse_depths(depths)
        meta.update(depths=[float(d) for d in depths], samples_per_depth=samples, num_candidates=num_candidates)
        base["custom_dataset"] = _fn(passkey_dataset)
        if family == "passkey":
            metric = "acc"
            base.update(
                output_type="multiple_choice", doc_to_text="context", doc_to_choice="choices",
                doc_to_target="label", target_delimiter=" ", process_results=_fn(passkey_mc_results),
            )
        else:
            metric = "exact_match"
            meta["gen_tokens"] = PASSKEY_GEN_TOKENS
            base.update(
                output_type="generate_until", doc_to_text="context", doc_to_target="answer",
                process_results=_fn(passkey_gen_results),
                generation_kwargs={"until": ["\n", "."], "max_gen_toks": PASSKEY_GEN_TOKENS, "do_sample": False, "temperature": 0.0},
            )
        names = [metric] + [f"{metric}_depth_{depth_label(d)}" for d in depths]
        base["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]
    elif family == "mqar":
        if pairs is None:
            raise MambaEvalError("an MQAR task needs a number of pairs")
        meta.update(pairs=int(pairs), num_samples=samples)
        base.update(
            custom_dataset=_fn(mqar_dataset), output_type="loglikelihood", doc_to_text="context",
            doc_to_target="target", target_delimiter="",
            metric_list=[
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        )
    elif family == "ppl":
        meta.update(num_windows=samples)
        if text_file:
            meta["text_file"] = str(text_file)
        if data_dir:
            meta["data_dir"] = str(data_dir)
        names = ["loss"] + [f"loss_{bucket_name(lo, hi)}" for lo, hi in position_buckets(length)]
        base.update(
            custom_dataset=_fn(ppl_position_dataset), output_type="loglikelihood", doc_to_text="context",
            doc_to_target="continuation", target_delimiter="", process_results=_fn(ppl_position_results),
            metric_list=[{"metric": m, "aggregation": _fn(token_loss), "higher_is_better": False} for m in names],
        )
    else:  # pragma: no cover - task_name() has refused it
        raise MambaEvalError(f"unknown probe family {family!r}")
    base["metadata"] = meta
    return base


def _group_config(family: str, tasks: Sequence[str]) -> dict:
    return {"group": FAMILIES[family][1], "task": list(tasks), "metadata": {"version": PROBE_DATA_VERSION}}


def render_yaml(config: Mapping, header: str = "") -> str:
    """``header`` then the config as YAML, ``!function`` references tagged as lm-eval reads them."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Function, _function_representer)
    Dumper.add_representer(str, _str_representer)
    return header + yaml.dump(dict(config), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)


#: The first lines of every written config.
HEADER = (
    "# Written by mamba_eval.harness.probe_data (python -m mamba_eval.harness.probe_data --write DIR); do not edit.\n"
    "# The documents are generated when lm-eval loads the task; see that module's docstring.\n"
)


def shipped_task_configs() -> dict[str, str]:
    """File name -> YAML text of the task configs shipped in ``tasks/probes/``."""
    files: dict[str, str] = {}
    for family, (_prefix, group, lengths) in FAMILIES.items():
        names = []
        for text in lengths:
            length = parse_length(text)
            for pairs in (MQAR_PAIRS if family == "mqar" else (None,)):
                cfg = task_config(family, length, pairs=pairs)
                files[f"{cfg['task']}.yaml"] = render_yaml(cfg, HEADER)
                names.append(cfg["task"])
        files[f"{group}.yaml"] = render_yaml(_group_config(family, names), HEADER)
    return files


def write_task_configs(folder: str | os.PathLike, configs: Mapping[str, str]) -> Path:
    """Write ``{file name: YAML text}`` into ``folder`` (each file atomically); return the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        atomic_write(out / name, text)
    return out


def include_path() -> Path:
    """The installed ``tasks/probes`` folder, for ``lm_eval --include_path``."""
    import importlib.resources

    return Path(str(importlib.resources.files("mamba_eval.tasks") / "probes"))


def required_max_length(lengths: Sequence[int]) -> int:
    """A ``max_length`` that holds every request of the probe tasks up to ``max(lengths)``."""
    return max(lengths) + 64


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mamba_eval.harness.probe_data``: print the include path of the probe tasks, or
    ``--write DIR``: write the shipped task configs into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mamba_eval.harness.probe_data", description=main.__doc__)
    parser.add_argument("--write", metavar="DIR", help="write the shipped task configs into DIR")
    args = parser.parse_args(argv)
    if args.write:
        write_task_configs(args.write, shipped_task_configs())
        print(args.write)
    else:
        print(include_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
