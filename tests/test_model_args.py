"""``--model_args`` of ``--model mamba`` (mamba_eval/harness/model_args.py) and the package's one
dtype parser (mamba_eval/models/dtypes.py): accepted keys derived from ``MambaLM.__init__``, the
run-wide flags lm-eval passes beside model_args, dtype aliases, value parsers."""

from __future__ import annotations

import argparse
import logging
import re

import pytest
import torch
import transformers
from helpers_data import REPO_ROOT

from mamba_eval.errors import MambaEvalError, ModelArgsError
from mamba_eval.harness import model_args
from mamba_eval.models.dtypes import DTYPE_NAMES, parse_dtype


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 1-layer transformers-format Mamba with the GPT-NeoX vocabulary rows: loads in a moment."""
    folder = tmp_path_factory.mktemp("model_args") / "ckpt"
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=16, num_hidden_layers=1, state_size=4)
    transformers.MambaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _lm(ckpt, tok_dir, **kw):
    from mamba_eval.harness.lm import MambaLM

    return MambaLM(pretrained=str(ckpt), tokenizer=str(tok_dir), device="cpu", **kw)


# ----------------------------------------------------------------------------- accepted keys


def test_unknown_key_lists_the_keys_of_the_signature(ckpt, tok_dir):
    from mamba_eval.harness.lm import MambaLM

    with pytest.raises(ModelArgsError) as err:
        _lm(ckpt, tok_dir, colour="blue", batchsize=2)
    message = str(err.value)
    assert message.startswith("unknown model_args key(s) for --model mamba: batchsize, colour (accepted: ")
    listed = message.split("(accepted: ", 1)[1].rstrip(")").split(", ")
    assert listed == model_args.accepted_keys(MambaLM)
    assert {"pretrained", "dtype", "decode_state_dtype", "context_chunk", "trust_remote_code"} <= set(listed)
    assert "self" not in listed and "kwargs" not in listed


def test_accepted_keys_follow_the_signature():
    """A parameter added to ``__init__`` is accepted and listed with no other edit."""

    class Base:
        def __init__(self, pretrained="x", dtype="auto", **kwargs):
            model_args.check_extra_keys(type(self), kwargs)

    class WithMore(Base):
        def __init__(self, pretrained="x", dtype="auto", new_knob=1, *, only_kw=None, **kwargs):
            super().__init__(pretrained, dtype, **kwargs)

    assert model_args.accepted_keys(Base) == ["dtype", "pretrained", "trust_remote_code", "use_fast_tokenizer"]
    assert model_args.accepted_keys(WithMore) == [
        "dtype", "new_knob", "only_kw", "pretrained", "trust_remote_code", "use_fast_tokenizer"]
    WithMore(new_knob=2, trust_remote_code=True)  # no-effect keys of `hf` pass
    with pytest.raises(ModelArgsError, match=r"new_knob \(accepted: dtype, pretrained, trust_remote_code"):
        Base(new_knob=2)


@pytest.mark.parametrize("doc, heading", [("README.md", "### model_args"), ("docs/model-args.md", "# model_args")])
def test_docs_tables_document_exactly_the_accepted_keys(doc, heading):
    from mamba_eval.harness.lm import MambaLM

    text = (REPO_ROOT / doc).read_text()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == set(model_args.accepted_keys(MambaLM))


# ----------------------------------------------------------------------------- run-wide flags


def test_batch_size_in_model_args_and_flag(ckpt, tok_dir, caplog):
    """lm-eval passes ``--batch_size``/``--device``/``--max_batch_size`` beside model_args (for
    ``hf`` a key in both is Python's ``TypeError: got multiple values``); the model_args value
    is used, and a differing flag is logged."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from mamba_eval.harness.lm import MambaLM

    # lm-eval's own command-line configuration, as `lm_eval --model mamba --model_args ... --batch_size 4`
    # builds it (--device not typed: lm-eval still passes its default, cuda:0).
    cfg = EvaluatorConfig.from_cli(argparse.Namespace(
        model="mamba", tasks="hellaswag", batch_size="4",
        model_args=f"pretrained={ckpt},tokenizer={tok_dir},batch_size=8,device=cpu,max_batch_size=3"))
    flags = {"batch_size": cfg.batch_size, "max_batch_size": cfg.max_batch_size, "device": cfg.device}
    assert flags == {"batch_size": "4", "max_batch_size": None, "device": "cuda:0"}
    with pytest.raises(TypeError, match="multiple values"):
        dict(**cfg.model_args, **flags)  # what lm-eval's create_from_arg_obj does with them
    with caplog.at_level(logging.WARNING, logger=model_args.__name__):
        lm = MambaLM.create_from_arg_obj(cfg.model_args, flags)
    assert lm.batch_size == 8 and lm._device == torch.device("cpu") and lm.max_batch_size == 3
    warned = " | ".join(r.getMessage() for r in caplog.records)
    assert "model_args batch_size=8 is used; the run's batch_size=4" in warned
    assert "model_args device=cpu is used; the run's device=cuda:0" in warned

    # The same through the model_args string; flags fill in what model_args leave out.
    lm = MambaLM.create_from_arg_string(f"pretrained={ckpt},tokenizer={tok_dir},batch_size=auto",
                                        {"batch_size": 4, "max_batch_size": 5, "device": "cpu"})
    assert lm.batch_size == "auto" and lm.max_batch_size == 5
    lm = MambaLM.create_from_arg_string(f"pretrained={ckpt},tokenizer={tok_dir}",
                                        {"batch_size": 4, "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size == 4 and lm.max_batch_size == 64


def test_merge_run_flags():
    merged = model_args.merge_run_flags({"pretrained": "p", "batch_size": "8"},
                                        {"batch_size": 8, "device": None, "max_batch_size": 2})
    assert merged == {"pretrained": "p", "batch_size": "8", "max_batch_size": 2}
    assert model_args.merge_run_flags({"a": 1}, None) == {"a": 1}


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("text, dtype", [
    ("float32", torch.float32), ("float", torch.float32), ("fp32", torch.float32), ("torch.float32", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("BF16", torch.bfloat16), (" bfloat16 ", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16), ("torch.half", torch.float16),
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
])
def test_dtype_aliases(text, dtype):
    assert parse_dtype(text) is dtype


def test_dtype_auto_and_errors():
    assert parse_dtype("auto") == "auto" and parse_dtype("AUTO") == "auto"
    assert set(DTYPE_NAMES.values()) == {torch.float32, torch.bfloat16, torch.float16}
    for bad, shown in [("bfloat61", "'bfloat61'"), ("float64", "'float64'"), (torch.int8, "torch.int8"),
                       (torch.float64, "torch.float64"), (None, "None"), ("", "''")]:
        with pytest.raises(MambaEvalError) as err:
            parse_dtype(bad, "decode_state_dtype")
        assert str(err.value) == f"decode_state_dtype={shown} is not one of auto, float32, bfloat16, float16"


def test_dtype_model_args(ckpt, tok_dir):
    """``dtype`` and ``decode_state_dtype`` take every alias (``dtype=bf16`` was refused by the
    adapter though the loader took it); ``decode_state_dtype=auto`` is the model's dtype."""
    lm = _lm(ckpt, tok_dir, dtype="bf16", decode_state_dtype="half")
    assert lm.model.dtype is torch.bfloat16 and lm.decode_state_dtype is torch.float16
    lm = _lm(ckpt, tok_dir, dtype=torch.float16, decode_state_dtype="auto")
    assert lm.model.dtype is torch.float16 and lm.decode_state_dtype is torch.float16
    lm = _lm(ckpt, tok_dir)
    assert lm.model.dtype is torch.float32 and lm.decode_state_dtype is torch.float32
    with pytest.raises(MambaEvalError, match=r"^dtype='float33' is not one of auto, float32, bfloat16, float16$"):
        _lm(ckpt, tok_dir, dtype="float33")
    with pytest.raises(MambaEvalError, match=r"^decode_state_dtype='int8' is not one of auto,"):
        _lm(ckpt, tok_dir, decode_state_dtype="int8")


# ----------------------------------------------------------------------------- value parsers


def test_value_parsers():
    assert model_args.parse_bool("x", "Yes") is True and model_args.parse_bool("x", "0") is False
    assert model_args.parse_bool("x", False) is False
    with pytest.raises(ModelArgsError, match=r"^share_context='maybe': expected true or false$"):
        model_args.parse_bool("share_context", "maybe")
    assert model_args.parse_positive("n", None) is None and model_args.parse_positive("n", "32") == 32
    for bad in ("0", "-1", "x", 1.5j):
        with pytest.raises(ModelArgsError, match=r"^context_chunk=.*: expected a positive integer$"):
            model_args.parse_positive("context_chunk", bad)
    assert model_args.parse_int("prefix_token_id", "7") == 7
    with pytest.raises(ModelArgsError, match=r"^prefix_token_id='bos': expected an integer$"):
        model_args.parse_int("prefix_token_id", "bos")
    assert model_args.parse_choice("rolling", "stateful", ("windows", "stateful")) == "stateful"
    with pytest.raises(ModelArgsError, match=r"^rolling='sliding' is not one of windows, stateful$"):
        model_args.parse_choice("rolling", "sliding", ("windows", "stateful"))
    assert [model_args.parse_batch_size(v) for v in (None, 4, "16", "auto", "auto:4")] == [1, 4, 16, "auto", "auto"]
    for bad, why in [("0", "must be at least 1"), ("autox", "expected an integer or 'auto'"),
                     ("eight", "expected an integer or 'auto'")]:
        with pytest.raises(ModelArgsError, match=f"^batch_size='{bad}': {why}$"):
            model_args.parse_batch_size(bad)
    assert model_args.parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelArgsError, match=r"^device='gpu0' is not a device torch knows$"):
        model_args.parse_device("gpu0")


def test_model_args_values_reach_the_model(ckpt, tok_dir):
    lm = _lm(ckpt, tok_dir, max_length="4096", context_chunk="64", prefix_token_id="3", add_bos_token="false",
             batch_size="auto:2", max_batch_size="7", rolling="stateful", share_context="no")
    assert (lm.max_length, lm.context_chunk, lm.prefix_token_id, lm.add_bos_token) == (4096, 64, 3, False)
    assert (lm.batch_size, lm.max_batch_size, lm.rolling, lm.share_context) == ("auto", 7, "stateful", False)
    assert lm.tok.add_special_tokens is False
    with pytest.raises(ModelArgsError, match=r"^max_length='0': expected a positive integer$"):
        _lm(ckpt, tok_dir, max_length="0")
