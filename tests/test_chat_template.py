"""``--apply_chat_template`` (with ``--fewshot_as_multiturn`` and ``--system_instruction``) for a
checkpoint whose tokenizer carries a chat template: the prompts ``--model mamba`` renders and
tokenises are those of lm-eval's ``hf`` model (transformers' own Mamba on the same checkpoint and
tokenizer), and so are the scores and generations of whole lm-eval runs. The one-line error of a
tokenizer without a template is in ``test_bad_inputs.py``."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import assert_same_lm_eval_run
from helpers_data import CHAT_TEMPLATE, require_data_dir, write_chat_tokenizer, write_generation_task
from mamba_eval.errors import MambaEvalError

SYSTEM = "Answer in one short sentence."

CHATS = [
    # zero-shot: one user turn
    [{"role": "user", "content": "Question: Which is heavier, a feather or a stone?\nAnswer:"}],
    # few-shot as turns of the chat, after a system instruction
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "Question: 2 + 2?\nAnswer:"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Question: 3 + 4?\nAnswer:"}],
]
# lm-eval's gen_prefix: the assistant's answer begun, to be continued (add_generation_prompt=False)
OPEN_ANSWER = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]


def _models(checkpoint, tokenizer, **model_args):
    from lm_eval.models.huggingface import HFLM

    from mamba_eval.harness.lm import MambaLM

    args = dict(pretrained=str(checkpoint), tokenizer=str(tokenizer), dtype="float32", device="cpu", **model_args)
    return MambaLM(**args), HFLM(**args)


@pytest.fixture(scope="module")
def models(neox_checkpoint, chat_tok_dir):
    return _models(neox_checkpoint, chat_tok_dir)


def test_rendered_prompts_equal_hf(models):
    ours, hf = models
    assert ours.chat_template(True) == hf.chat_template(True) == CHAT_TEMPLATE
    assert ours.tokenizer_name == hf.tokenizer_name  # part of lm-eval's request-cache key
    for chat in CHATS:
        prompt = ours.apply_chat_template(chat)
        assert prompt == hf.apply_chat_template(chat)
        assert prompt.endswith("<|assistant|>\n") and prompt.count("<|user|>") == sum(
            m["role"] == "user" for m in chat)
        assert ours.tok_encode(prompt) == hf.tok_encode(prompt)
    prompt = ours.apply_chat_template(OPEN_ANSWER, add_generation_prompt=False)
    assert prompt == hf.apply_chat_template(OPEN_ANSWER, add_generation_prompt=False)
    assert prompt.endswith("<|assistant|>\nThe colour is")


def test_template_without_system_role_falls_back_as_hf(neox_checkpoint, tok_dir, tmp_path):
    """A template that refuses the system role is rendered without the system messages, as
    ``hf`` does; one that fails even then, or templates transformers cannot choose from, are
    one line."""
    refusing = write_chat_tokenizer(tok_dir, tmp_path / "refusing", (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE))
    ours, hf = _models(neox_checkpoint, refusing)
    prompt = ours.apply_chat_template(CHATS[1])
    assert prompt == hf.apply_chat_template(CHATS[1])
    assert SYSTEM not in prompt and "<|user|>\nQuestion: 3 + 4?" in prompt

    ours.tokenizer.chat_template = "{{ raise_exception('no chats here') }}"
    with pytest.raises(MambaEvalError, match=r"the chat template of tokenizer .* failed: TemplateError: no chats"):
        ours.apply_chat_template(CHATS[0])
    ours.tokenizer.chat_template = {"short": CHAT_TEMPLATE, "long": CHAT_TEMPLATE}
    with pytest.raises(MambaEvalError, match=r"ValueError: This model has multiple chat templates with no default"):
        ours.apply_chat_template(CHATS[0])


def _bos_adding_tokenizer(chat_tok_dir, out_dir):
    """The chat tokenizer made to add ``<|endoftext|>`` before every text (as Llama's adds its
    BOS), with a template that writes the BOS token itself (as Llama 3's does)."""
    shutil.copytree(chat_tok_dir, out_dir)
    spec = json.loads((out_dir / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}]}
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    # the fast tokenizer's own class keeps tokenizer.json's post-processor as written
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template="{{ bos_token }}" + CHAT_TEMPLATE)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


def test_template_with_its_own_bos_gets_one_bos_as_in_hf(neox_checkpoint, chat_tok_dir, tmp_path):
    """A rendered prompt that starts with the BOS text is tokenised without the tokenizer's own
    BOS, as ``hf``'s ``tok_encode`` does, in every path: single strings, many at once, the
    (context, continuation) pairs of loglikelihood, and the prompts of generate_until."""
    ours, hf = _models(neox_checkpoint, _bos_adding_tokenizer(chat_tok_dir, tmp_path / "bos"))
    prompt = ours.apply_chat_template(CHATS[1])
    assert prompt == hf.apply_chat_template(CHATS[1]) and prompt.startswith("<|endoftext|><|system|>")
    plain = "Question: 3 + 4?\nAnswer:"
    assert ours.tok_encode(plain)[0] == 0  # the tokenizer adds its BOS to other text
    ids = ours.tok_encode(prompt)
    assert ids == hf.tok_encode(prompt) and ids[:2] != [0, 0] and ids[0] == 0
    texts = [prompt, plain, prompt + " 7", "<|endoftext|>"]
    assert ours.tok_encode_many(texts) == [hf.tok_encode(t) for t in texts]
    pairs = [(prompt, "7"), (prompt, " 7"), (plain, " 7"), (prompt + " 7 ", "is right")]
    assert ours.encode_pairs(pairs) == [hf._encode_pair(c, x) for c, x in pairs]
    for text in (prompt, plain):  # generate_until tokenises each prompt; hf a batch
        assert ours.tok_encode(text) == hf.tok_batch_encode([text])[0][0].tolist()


def test_lm_eval_runs_equal_hf_under_chat_template(neox_checkpoint, chat_tok_dir, tmp_path):
    """A multiple-choice task with two few-shot examples as turns of the chat and a generation
    task, through lm-eval's ``simple_evaluate`` with a chat template and a system instruction:
    the same prompts, scores and generated texts as ``hf``. (Few-shot examples inside one user
    turn, ``fewshot_as_multiturn=False``, reach the model through the same rendering.)"""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mamba_eval.harness.offline import prepare_offline_tasks

    data = require_data_dir()
    rows = [json.loads(line) for line in (data / "hellaswag" / "hellaswag_val.jsonl").open()][:3]
    tasks = prepare_offline_tasks(data)
    # The answer begun with the prompt's last words (a gen_prefix, rendered with the assistant's
    # turn left open), so that what a small random model generates differs from prompt to prompt.
    write_generation_task(tmp_path / "gen", "mamba_eval_test_chat_generate", [r["ctx"] for r in rows],
                          {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                          gen_prefix="{{prompt.split(' ')[-3:]|join(' ')}}")
    runs = {}
    for name in ("mamba", "hf"):
        runs[name] = simple_evaluate(
            model=name, model_args=f"pretrained={neox_checkpoint},tokenizer={chat_tok_dir},dtype=float32",
            tasks=["arc_easy", "mamba_eval_test_chat_generate"], num_fewshot=2, limit=3, device="cpu", batch_size=4,
            apply_chat_template=True, fewshot_as_multiturn=True, system_instruction=SYSTEM,
            task_manager=TaskManager(include_path=[str(tasks), str(tmp_path / "gen")]),
            log_samples=True, bootstrap_iters=0,
        )
    for task in ("arc_easy", "mamba_eval_test_chat_generate"):
        assert_same_lm_eval_run(runs["mamba"], runs["hf"], task)
    prompt = runs["mamba"]["samples"]["arc_easy"][0]["arguments"][0][0]
    assert prompt.startswith(f"<|system|>\n{SYSTEM}<|endoftext|>\n<|user|>\n") and prompt.count("<|user|>") == 3
    samples = runs["mamba"]["samples"]["mamba_eval_test_chat_generate"]
    for sample in samples:
        words = sample["doc"]["prompt"].split(" ")[-3:]
        assert sample["arguments"][0][0].endswith("<|endoftext|>\n<|assistant|>\n" + " ".join(words))
    generated = [s["resps"][0][0] for s in samples]
    assert len(set(generated)) == len(generated), f"generations alike: the comparison would prove little {generated}"
