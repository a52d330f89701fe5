"""The self-contained offline demo (mamba_eval.commands.demo): tokenizer, random checkpoint, task.

The checkpoint is checked against transformers' own Mamba implementation, an independent
reference: after the single key rename that separates the two formats
(``backbone.embedding`` -> ``backbone.embeddings``) it must load with no missing or unexpected
key, and the model must score the demo task end to end through lm-eval.
"""

from __future__ import annotations

import json
import math

import pytest

from mamba_eval.commands.demo import DEMO_NUM_DOCS, DEMO_TASK, build_demo, demo_lm_eval_args


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo["tokenizer"])


@pytest.fixture(scope="module")
def state_dict(demo):
    import torch

    return torch.load(demo["model"] / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _hf_model(config: dict, state_dict: dict):
    """transformers' MambaForCausalLM holding the demo weights (strict load)."""
    from transformers import MambaConfig, MambaForCausalLM

    rows = state_dict["backbone.embedding.weight"].shape[0]
    hf_config = MambaConfig(
        vocab_size=rows,
        hidden_size=config["d_model"],
        num_hidden_layers=config["n_layer"],
        state_size=16,
        expand=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=config["residual_in_fp32"],
        tie_word_embeddings=config["tie_embeddings"],
    )
    model = MambaForCausalLM(hf_config).eval()
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state_dict.items()}
    result = model.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def test_paths(demo):
    for key in ("model", "tokenizer", "tasks"):
        assert demo[key].is_dir() and demo[key].is_absolute()
    for name in ("config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"):
        assert (demo["model"] / name).is_file()
    assert demo["task_yaml"].parent == demo["tasks"] and demo["task_data"].is_file()


def test_tokenizer_loads_and_round_trips(tokenizer, demo):
    assert type(tokenizer).__name__ == "GPTNeoXTokenizer"
    assert tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    text = 'The key is amber otter 42.\n  "Tabs\tand ümlauts, 日本語 & emoji 🙂" '
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 0 not in ids  # no BOS/EOS added
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    with open(demo["model"] / "tokenizer_config.json") as fh:
        assert json.load(fh)["eos_token"] == "<|endoftext|>"


def test_checkpoint_config_and_shapes(demo, tokenizer, state_dict):
    config = json.loads((demo["model"] / "config.json").read_text())
    assert config["d_model"] == 64 and config["n_layer"] == 2 and config["ssm_cfg"] == {}
    assert config["vocab_size"] == len(tokenizer)
    multiple = config["pad_vocab_size_multiple"]
    rows = math.ceil(len(tokenizer) / multiple) * multiple
    d, e, n, k, r = 64, 128, 16, 4, 4  # d_model, d_inner, d_state, d_conv, dt_rank
    expected = {"backbone.embedding.weight": (rows, d), "backbone.norm_f.weight": (d,), "lm_head.weight": (rows, d)}
    for i in range(2):
        p = f"backbone.layers.{i}."
        expected |= {
            p + "norm.weight": (d,),
            p + "mixer.in_proj.weight": (2 * e, d),
            p + "mixer.conv1d.weight": (e, 1, k),
            p + "mixer.conv1d.bias": (e,),
            p + "mixer.x_proj.weight": (r + 2 * n, e),
            p + "mixer.dt_proj.weight": (e, r),
            p + "mixer.dt_proj.bias": (e,),
            p + "mixer.A_log": (e, n),
            p + "mixer.D": (e,),
            p + "mixer.out_proj.weight": (d, e),
        }
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected
    assert all(str(v.dtype) == "torch.float32" for v in state_dict.values())
    assert (state_dict["lm_head.weight"] == state_dict["backbone.embedding.weight"]).all()


def test_checkpoint_runs_in_transformers(demo, tokenizer, state_dict):
    import torch

    config = json.loads((demo["model"] / "config.json").read_text())
    model = _hf_model(config, state_dict)
    ids = tokenizer("The key is amber otter 42. What was the key?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], state_dict["lm_head.weight"].shape[0])
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_build_is_deterministic(demo, state_dict, tmp_path):
    import torch

    again = build_demo(tmp_path)
    for key in ("task_data", "task_yaml"):
        # the YAML names its data file by absolute path, which differs between the two folders
        a, b = demo[key].read_text(), again[key].read_text()
        assert a.replace(str(demo["tasks"]), "") == b.replace(str(again["tasks"]), "")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (demo["model"] / name).read_bytes() == (again["model"] / name).read_bytes()
    other = torch.load(again["model"] / "pytorch_model.bin", weights_only=True)
    assert other.keys() == state_dict.keys()
    assert all(torch.equal(other[k], state_dict[k]) for k in state_dict)


def test_task_loads_and_evaluates(demo, tokenizer, state_dict):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(demo["tasks"]), include_defaults=False)
    task = tm.load([DEMO_TASK])["tasks"][DEMO_TASK]
    docs = task.eval_docs
    assert len(docs) == DEMO_NUM_DOCS
    for doc in docs:
        key = doc["context"].split("The key is ", 1)[1].split(".", 1)[0]
        assert doc["choices"][doc["label"]] == key and doc["choices"].count(key) == 1
        assert len(doc["choices"]) == 4

    config = json.loads((demo["model"] / "config.json").read_text())
    model = _hf_model(config, state_dict)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device="cpu")
    limit = 8
    results = simple_evaluate(model=lm, tasks=[task], limit=limit)["results"][DEMO_TASK]
    assert results["sample_len"] == limit

    # The same accuracy scored by hand: log p(" " + choice | context), summed over the choice's
    # tokens; all sequences in one right-padded batch (padding after a sequence cannot change
    # a causal model's logits inside it).
    docs = list(docs)[:limit]
    seqs, spans = [], []
    for doc in docs:
        context = tokenizer(doc["context"])["input_ids"]
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice)["input_ids"]
            assert whole[: len(context)] == context
            seqs.append(whole)
            spans.append(range(len(context), len(whole)))
    width = max(map(len, seqs))
    batch = torch.tensor([seq + [tokenizer.pad_token_id] * (width - len(seq)) for seq in seqs])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(batch).logits.double(), dim=-1)
    scores = [sum(logprobs[j, i - 1, seq[i]].item() for i in span) for j, (seq, span) in enumerate(zip(seqs, spans))]
    correct = sum(
        max(range(4), key=lambda c: scores[4 * n + c]) == doc["label"] for n, doc in enumerate(docs)
    )
    assert results["acc,none"] == pytest.approx(correct / limit)


def test_lm_eval_args(demo):
    args = demo_lm_eval_args(demo)
    assert args[args.index("--tasks") + 1] == DEMO_TASK
    assert args[args.index("--include_path") + 1] == str(demo["tasks"])
    assert args[args.index("--model_args") + 1] == f"pretrained={demo['model']}"
