"""Cached generation: decoding equals the full forward, prompts of mixed lengths do not disturb
each other, stop conditions and sampling behave; and `generate_until` through lm-eval gives the
same text as lm-eval's `hf` model (transformers' own Mamba) with greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_data import require_data_dir, write_generation_task
from mamba_eval.harness.generation import SamplingParams, generate
from mamba_eval.models.checkpoint import load_model


@pytest.fixture(params=["mamba1-tiny", "mamba2-small"])
def model(request, checkpoint):
    return load_model(checkpoint(request.param).ssm_dir, dtype="float32", device="cpu")


def _greedy_by_forward(model, prompt, n):
    """Greedy continuation recomputed with one full forward per token (no state reuse)."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_forward_and_mixed_lengths_do_not_interfere(model):
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (7, 3, 7, 12, 1)]
    together = generate(model, prompts, max_new_tokens=6, device=torch.device("cpu"), batch_size=4)
    for prompt, out in zip(prompts, together):
        assert out == _greedy_by_forward(model, prompt, 6)
    alone = [generate(model, [p], max_new_tokens=6, device=torch.device("cpu"))[0] for p in prompts]
    assert together == alone


def test_stop_condition_and_eos(model):
    prompt = [5, 6, 7]
    full = _greedy_by_forward(model, prompt, 8)
    # Stop as soon as the third generated token appears.
    out = generate(model, [prompt], max_new_tokens=8, device=torch.device("cpu"),
                   is_stopped=lambda toks: len(toks) >= 1 and toks[-1] == full[2])
    assert out[0] == full[:full.index(full[2]) + 1]
    # The same token as EOS: generation ends before it, and it is not returned.
    out = generate(model, [prompt], max_new_tokens=8, device=torch.device("cpu"), eos_id=full[2])
    assert out[0] == full[:full.index(full[2])]


def test_sampling_is_reproducible_by_seed(model):
    prompts = [[3, 4, 5], [9, 8]]
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a = generate(model, prompts, max_new_tokens=10, params=params, device=torch.device("cpu"))
    b = generate(model, prompts, max_new_tokens=10, params=params, device=torch.device("cpu"))
    c = generate(model, prompts, max_new_tokens=10, device=torch.device("cpu"),
                 params=SamplingParams(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=8))
    assert a == b
    assert a != c
    greedy = generate(model, prompts, max_new_tokens=10, device=torch.device("cpu"))
    assert a != greedy


def test_top_k_one_is_greedy(model):
    prompts = [[3, 4, 5]]
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=1, seed=1)
    assert generate(model, prompts, max_new_tokens=6, params=params, device=torch.device("cpu")) == \
        generate(model, prompts, max_new_tokens=6, device=torch.device("cpu"))


def test_generate_until_matches_hf_through_lm_eval(tmp_path):
    """A generation task with stop strings, run by lm-eval with `mamba` and with `hf`."""
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = require_data_dir()
    rows = [json.loads(line) for line in (data / "hellaswag" / "hellaswag_val.jsonl").open()][:8]
    task_dir = write_generation_task(tmp_path / "tasks", "mamba_eval_test_generate", [r["ctx"] for r in rows],
                                     {"until": [".", "\n"], "max_gen_toks": 12, "do_sample": False},
                                     targets=[r["endings"][0] for r in rows])
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=64, num_hidden_layers=2, state_size=8,
                                   residual_in_fp32=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf_model = transformers.MambaForCausalLM(cfg)
    with torch.no_grad():
        hf_model.backbone.embeddings.weight.normal_(0.0, 0.5)
    hf_model.save_pretrained(tmp_path / "ckpt")
    outputs = {}
    for name in ("mamba", "hf"):
        res = simple_evaluate(
            model=name, tasks=["mamba_eval_test_generate"], device="cpu", batch_size=4,
            model_args=f"pretrained={tmp_path / 'ckpt'},tokenizer={data / 'tokenizers' / 'gpt-neox-20b'},dtype=float32",
            task_manager=TaskManager(include_path=str(task_dir)), log_samples=True, bootstrap_iters=0,
        )
        outputs[name] = [s["resps"][0][0] for s in res["samples"]["mamba_eval_test_generate"]]
    assert len(outputs["mamba"]) == 8
    assert outputs["mamba"] == outputs["hf"]
    assert any(outputs["mamba"]), "every generation is empty: the comparison would prove nothing"


BAD_GEN_KWARGS = [
    ({"max_gen_toks": 0}, "max_gen_toks=0: expected a positive integer"),
    ({"max_gen_toks": -3}, "max_gen_toks=-3: expected a positive integer"),
    ({"max_gen_toks": 1.5}, "max_gen_toks=1.5: expected a positive integer"),
    ({"max_new_tokens": "many"}, "max_new_tokens='many': expected a positive integer"),
    ({"max_gen_toks": True}, "max_gen_toks=True: expected a positive integer"),
    ({"until": 5}, "until=5: expected a string or a list of strings"),
    ({"until": [".", ["\n"]]}, "until=['.', ['\\n']]: expected a string or a list of strings"),
    ({"do_sample": "yes"}, "do_sample='yes': expected true or false"),
    ({"temperature": "hot"}, "temperature='hot': expected a number >= 0"),
    ({"temperature": -1}, "temperature=-1: expected a number >= 0"),
    ({"top_p": 1.5}, "top_p=1.5: expected a number from 0 to 1"),
    ({"top_k": -1}, "top_k=-1: expected an integer >= 0"),
    ({"seed": "x"}, "seed='x': expected an integer"),
    ({"num_beams": 4}, "num_beams=4: beam search is not implemented"),
    ({"repetition_penalty": 1.2, "length_penalty": 1.0},
     "generation kwargs not supported by --model mamba: length_penalty, repetition_penalty (supported: until, "),
    ({"max_length": 64}, "not supported by --model mamba: max_length (supported: until, max_gen_toks, max_new_tokens, "
                         "max_tokens, max_completion_tokens, do_sample, temperature, top_k, top_p, seed, num_beams); "
                         "max_length: give the tokens to generate as max_gen_toks"),
    ("until=.", "generation kwargs 'until=.': expected a mapping"),
]


@pytest.mark.parametrize("gen_kwargs, message", BAD_GEN_KWARGS, ids=[m.split(":")[0] for _, m in BAD_GEN_KWARGS])
def test_bad_gen_kwargs_are_one_line(gen_kwargs, message):
    from mamba_eval.errors import MambaEvalError
    from mamba_eval.harness.generation import parse_gen_kwargs

    with pytest.raises(MambaEvalError) as err:
        parse_gen_kwargs(gen_kwargs, default_max_gen_toks=256, eos="<|endoftext|>", where="task t")
    text = str(err.value)
    assert text.startswith("task t: ") and message in text and "\n" not in text, text


def test_gen_kwargs_read_as_lm_eval_reads_them():
    """lm-eval's own normalisation (aliases of max_gen_toks, do_sample and temperature made
    consistent, the EOS text among the stop strings); None is not given; num_beams=1 is what
    the decoder does."""
    from mamba_eval.harness.generation import GenerationSettings, SamplingParams, parse_gen_kwargs

    def parse(**kwargs):
        return parse_gen_kwargs(kwargs, default_max_gen_toks=256, eos="<E>")

    assert parse() == GenerationSettings(["<E>"], 256, SamplingParams())
    assert parse(until="\n\n", max_new_tokens=32, num_beams=1, top_p=None) == GenerationSettings(
        ["\n\n", "<E>"], 32, SamplingParams())
    assert parse(until=[".", "<E>"], max_gen_toks=8.0, max_tokens=99) == GenerationSettings(
        [".", "<E>"], 8, SamplingParams())
    assert parse(temperature=0.7, top_k=40, top_p=0.9, seed=3).params == SamplingParams(
        do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=3)
    assert parse(do_sample=False, temperature=0.7).params.greedy


@torch.inference_mode()
def test_sampling_edge_values_stay_finite():
    """A temperature so small that logits / temperature overflow, and top_p=0 (only the top
    token, as in transformers), pick the argmax instead of failing on NaN probabilities (a
    device-side assert on CUDA)."""
    from mamba_eval.harness.generation import sample_next

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 10
    generator = torch.Generator().manual_seed(1)
    for params in (SamplingParams(do_sample=True, temperature=1e-40),
                   SamplingParams(do_sample=True, temperature=1.0, top_p=0.0)):
        assert torch.equal(sample_next(logits, params, generator), logits.argmax(dim=-1)), params


def test_long_prompts_are_left_truncated_as_hf(neox_checkpoint, data_dir, tok_dir, caplog):
    """A prompt longer than max_length - max_gen_toks keeps its last tokens, with a warning, and
    the text generated equals lm-eval's ``hf`` model's at the same max_length."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mamba_eval.harness.lm import MambaLM

    rows = [json.loads(line) for line in (data_dir / "hellaswag" / "hellaswag_val.jsonl").open()][1:3]
    requests = [Instance("generate_until", doc={}, idx=i, arguments=(r["ctx"], {"until": ["\n"], "max_gen_toks": 6}))
                for i, r in enumerate(rows)]
    args = dict(pretrained=str(neox_checkpoint), tokenizer=str(tok_dir), dtype="float32", device="cpu")
    short = MambaLM(max_length=16, **args)
    assert all(len(short.tok_encode(r["ctx"])) > 10 for r in rows)  # longer than the 10 tokens left
    with caplog.at_level("WARNING", logger="mamba_eval.harness.lm"):
        ours = short.generate_until(requests, disable_tqdm=True)
    assert "2 prompt(s) longer than max_length 16 - max_gen_toks 6 were cut to their last 10 tokens" in caplog.text
    assert short.generation_stats.prompt_tokens == 2 * 10  # what the model was given
    assert ours == HFLM(max_length=16, **args).generate_until(requests, disable_tqdm=True)


def _generate_reallocating(model, prompts, max_new_tokens, eos_id=None, is_stopped=None, batch_size=16):
    """Greedy generation as done before the decode runner: equal-length buckets, prefill, then
    ``model.step`` on a state that is rebuilt with ``index_select`` whenever rows finish."""
    outs = [[] for _ in prompts]
    buckets = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    for length in sorted(buckets, reverse=True):
        for start in range(0, len(buckets[length]), batch_size):
            rows = buckets[length][start:start + batch_size]
            hidden, state = model.backbone_forward(torch.tensor([prompts[i] for i in rows]), return_state=True)
            logits = model.lm_logits(hidden[:, -1]).float()
            live = list(rows)
            for _ in range(max_new_tokens):
                keep = []
                for pos, (i, tok) in enumerate(zip(live, logits.argmax(-1).tolist())):
                    if tok == eos_id:
                        continue
                    outs[i].append(tok)
                    if len(outs[i]) < max_new_tokens and not (is_stopped and is_stopped(outs[i])):
                        keep.append(pos)
                if not keep:
                    break
                step_ids = logits.argmax(-1)[keep]
                state = [layer.index_select(keep) for layer in state]
                live = [live[p] for p in keep]
                logits = model.step(step_ids, state).float()
    return outs


@torch.inference_mode()
def test_decode_runner_equals_reallocating_generation(model):
    """Rows finishing at different times (stop rule, EOS, length) are compacted in place in the
    runner's fixed buffers; the tokens equal those of the reallocating loop, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (5, 5, 5, 5, 5, 2, 9, 9, 9)]
    probe = _generate_reallocating(model, prompts, 10)
    eos = probe[1][3]  # ends row 1 (and any other row that meets it) early
    stop_tok = probe[2][5]

    def stopped(toks):
        return toks[-1] == stop_tok

    for bs in (3, 16):
        expect = _generate_reallocating(model, prompts, 10, eos_id=eos, is_stopped=stopped, batch_size=bs)
        got = generate(model, prompts, max_new_tokens=10, eos_id=eos, is_stopped=stopped, batch_size=bs,
                       device=torch.device("cpu"))
        assert got == expect
        assert len({len(o) for o in got}) >= 3, "rows should finish at different times"


@torch.inference_mode()
def test_decode_runner_compaction_keeps_the_right_states(model):
    from mamba_eval.harness.generation import DecodeRunner

    runner = DecodeRunner(model, 6)
    ids = torch.randint(2, model.config.vocab_size, (4, 5), generator=torch.Generator().manual_seed(2))
    _, state = model.backbone_forward(ids, return_state=True)
    runner.load(state)
    ptrs = [layer.ssm.data_ptr() for layer in runner.state]
    tok = torch.tensor([3, 4, 5, 6])
    expect_state = [layer.clone() for layer in state]
    expect = model.step(tok, expect_state)
    assert torch.equal(runner.run(tok), expect)
    keep = [1, 3]
    runner.compact(keep)
    expect_state = [layer.index_select(keep) for layer in expect_state]
    tok2 = torch.tensor([7, 8])
    assert torch.equal(runner.run(tok2), model.step(tok2, expect_state))
    for buf, ref in zip(runner.view(2), expect_state):
        assert torch.equal(buf.conv, ref.conv) and torch.equal(buf.ssm, ref.ssm)
    assert ptrs == [layer.ssm.data_ptr() for layer in runner.state]  # no reallocation
    with pytest.raises(ValueError, match="cuda_graphs"):
        DecodeRunner(model, 2, cuda_graphs=True)


def test_tail_stop_check_equals_full_decode_check():
    """At every step where the full-text check has not fired yet, the tail-window check gives the
    same answer, on real GPT-NeoX tokens of text with multi-byte characters and on random token
    ids (whose bytes split characters anywhere)."""
    import transformers
    from mamba_eval.harness.generation import tail_stop_checker

    tok = transformers.AutoTokenizer.from_pretrained(str(require_data_dir() / "tokenizers" / "gpt-neox-20b"))

    def decode(t):
        return tok.decode(t, skip_special_tokens=False)

    text = ("Grüße aus Köln — naïve café. 日本語のテキスト、絵文字😀👍🏽 も。\n\nΑλφα βήτα; "
            "Ünïcödé résumé: 漢字😀 end.\nQ: what? A: 42 ≥ 41 ✓ ") * 3
    sequences = [tok.encode(text)]
    gen = torch.Generator().manual_seed(3)
    sequences += [torch.randint(0, 50277, (120,), generator=gen).tolist() for _ in range(3)]
    stop_sets = [["\n\n"], ["."], ["😀"], ["絵文字", "Q:"], ["A: 42 ≥"], ["\ufffd"], ["é", "ü"], ["end.\nQ"]]
    fired = 0
    for seq in sequences:
        for stops in stop_sets:
            tail = tail_stop_checker(decode, stops)
            for t in range(1, len(seq) + 1):
                full = any(s in decode(seq[:t]) for s in stops)
                assert tail(seq[:t]) == full, (stops, t)
                if full:
                    fired += 1
                    break
    assert fired >= 12, "too few stop strings were met: the comparison would prove little"
    with pytest.raises(ValueError, match="stop strings"):
        tail_stop_checker(decode, [""])


def test_several_greedy_steps_per_look_give_the_same_tokens(model):
    """Decoding blocks of greedy steps (the host looks at the tokens once a block) gives exactly the
    tokens of one step at a time, also when sequences stop or meet EOS inside a block."""
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (5, 5, 5, 2)]
    cpu = torch.device("cpu")
    one = generate(model, prompts, max_new_tokens=11, device=cpu, batch_size=4, greedy_steps=1)
    assert generate(model, prompts, max_new_tokens=11, device=cpu, batch_size=4, greedy_steps=4) == one
    # Stop row 0 after its 3rd token and give row 1's 6th token the role of EOS: both inside a block.
    eos = one[1][5]
    stop_at = tuple(one[0][:3])
    kwargs = dict(max_new_tokens=11, device=cpu, batch_size=4, eos_id=eos,
                  is_stopped=lambda toks: tuple(toks) == stop_at)
    expected = generate(model, prompts, greedy_steps=1, **kwargs)
    assert expected[0] == one[0][:3]
    assert expected[1] == one[1][:one[1].index(eos)]
    assert generate(model, prompts, greedy_steps=4, **kwargs) == expected
    assert generate(model, prompts, greedy_steps=3, **kwargs) == expected


def test_decode_runner_is_reused(model):
    from mamba_eval.harness.generation import decode_runner

    a = decode_runner(model, 3, cuda_graphs=False, greedy_steps=2)
    assert decode_runner(model, 3, cuda_graphs=False, greedy_steps=2) is a
    assert decode_runner(model, 3, cuda_graphs=False, greedy_steps=1) is not a


def test_long_prompts_prefill_in_chunks(model):
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, model.config.vocab_size, (23,), generator=gen).tolist() for _ in range(2)]
    cpu = torch.device("cpu")
    whole = generate(model, prompts, max_new_tokens=5, device=cpu)
    assert generate(model, prompts, max_new_tokens=5, device=cpu, prefill_chunk=4) == whole


@torch.inference_mode()
def test_bfloat16_decode_state(model):
    """States stored in bf16 between steps (mamba_ssm's cache dtype): the buffers are bf16, each
    step's logits stay within bf16 rounding of the fp32-state step, and rows still do not
    depend on their batch (bf16 storage rounds each element on its own)."""
    from mamba_eval.harness.generation import DecodeRunner

    runner = DecodeRunner(model, 3, state_dtype=torch.bfloat16)
    ssm = [layer.ssm for layer in runner.state]
    assert all(t.dtype == torch.bfloat16 for t in ssm)
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (3, 6), generator=gen)
    exact, half = model.allocate_state(3), model.allocate_state(3, state_dtype=torch.bfloat16)
    for t in range(ids.shape[1]):
        ref = model.step(ids[:, t], exact)
        got = model.step(ids[:, t], half)
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= 2e-2 * scale, t
        assert (got - ref).abs().max() > 0 or t == 0  # the rounding is really there after a step
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (4, 4, 7)]
    cpu = torch.device("cpu")
    together = generate(model, prompts, max_new_tokens=6, device=cpu, batch_size=3, state_dtype=torch.bfloat16)
    alone = [generate(model, [p], max_new_tokens=6, device=cpu, state_dtype=torch.bfloat16)[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("arg, dtype, expected", [
    (None, "float32", torch.float32), ("bfloat16", "float32", torch.bfloat16), ("auto", "bfloat16", torch.bfloat16),
])
def test_decode_state_dtype_model_arg_reaches_generation(arg, dtype, expected, tmp_path, monkeypatch):
    """``decode_state_dtype`` (model_arg) is the state storage ``generate_until`` decodes with."""
    import transformers
    from lm_eval.api.instance import Instance

    import mamba_eval.harness.lm as lm_mod

    data = require_data_dir()
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=16, num_hidden_layers=1, state_size=4)
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    seen = []
    real = lm_mod.generate
    monkeypatch.setattr(lm_mod, "generate", lambda *a, **kw: seen.append(kw["state_dtype"]) or real(*a, **kw))
    extra = {} if arg is None else {"decode_state_dtype": arg}
    lm = lm_mod.MambaLM(pretrained=str(tmp_path / "ckpt"), tokenizer=str(data / "tokenizers" / "gpt-neox-20b"),
                        dtype=dtype, device="cpu", **extra)
    out = lm.generate_until([Instance("generate_until", doc={}, idx=0,
                                      arguments=("The cat", {"until": ["\n"], "max_gen_toks": 3}))])
    assert len(out) == 1 and seen == [expected]
    stats = lm.generation_stats
    assert stats.requests == 1 and 1 <= stats.generated_tokens <= 3 and stats.seconds > 0
    assert stats.prompt_tokens == len(lm.tok_encode("The cat"))


def _counting_forwards(model, monkeypatch):
    """Record every ``backbone_forward`` as (rows, length, with lengths or not)."""
    calls = []
    real = model.backbone_forward

    def counted(input_ids, *args, **kwargs):
        calls.append((input_ids.shape[0], input_ids.shape[1], kwargs.get("lengths") is not None))
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "backbone_forward", counted)
    return calls


def test_prompts_of_mixed_lengths_share_a_prefill(model, monkeypatch, one_torch_thread):
    """Prompts of different lengths prefill together, right-padded (each row's state and first
    token taken at its own end): the greedy tokens equal each prompt alone, equal-length
    prefills only (as before) and the full forward; fewer forwards run; prompts shorter than
    RAGGED_MIN_LENGTH or longer than prefill_chunk keep prefills of their own length."""
    from mamba_eval.harness.generation import GenerateTimes
    from mamba_eval.models.rows import RAGGED_MIN_LENGTH

    gen = torch.Generator().manual_seed(6)
    vocab = model.config.vocab_size
    sizes = (5, 9, 9, 17, 4, 12, RAGGED_MIN_LENGTH - 1)
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in sizes]
    cpu = torch.device("cpu")
    kwargs = dict(max_new_tokens=6, device=cpu, batch_size=8, greedy_steps=1)
    calls = _counting_forwards(model, monkeypatch)
    times = GenerateTimes()
    mixed = generate(model, prompts, times=times, **kwargs)
    mixed_calls = list(calls)
    calls.clear()
    exact = generate(model, prompts, mixed_lengths=False, **kwargs)
    exact_calls = list(calls)
    alone = [generate(model, [p], max_new_tokens=6, device=cpu, batch_size=1)[0] for p in prompts]
    assert mixed == exact == alone
    for i in (0, 5):  # the rows padded most (5 of 9, 12 of 17 tokens)
        assert mixed[i] == _greedy_by_forward(model, prompts[i], 6)
    assert len(exact_calls) == len(set(sizes))  # one prefill per distinct length
    # 17+12 | 9+9+5 | 4 (a fifth row would take the padding past MAX_PADDING_RATIO) | 3 alone
    assert mixed_calls == [(2, 17, True), (3, 9, True), (1, 4, False), (1, 3, False)]
    assert times.prefill_forwards == len(mixed_calls)
    assert times.prefill_tokens == sum(sizes)
    assert times.padded_prefill_tokens == sum(rows * width for rows, width, _ in mixed_calls)
    # greedy decoding feeds each sequence's tokens on as they come: 6 steps for 6 tokens, the
    # first from the prefill, the last step's token not needed
    assert times.decode_steps == 6 * len(mixed_calls)
    assert times.prefill_s > 0 and times.decode_s > 0
    # Longer than prefill_chunk: chunked prefills of one length; the rest still mixed.
    calls.clear()
    assert generate(model, prompts, prefill_chunk=8, **kwargs) == mixed
    assert [c for c in calls if c[2]] == [(2, 5, True)]  # 5 and 4 together
    # Seeded sampling over mixed prefills is reproducible.
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=3)
    assert generate(model, prompts, params=params, **kwargs) == generate(model, prompts, params=params, **kwargs)


def test_prefill_groups_bound_padding_and_keep_batch_size():
    from mamba_eval.harness.generation import MAX_PADDING_RATIO, prefill_groups
    from mamba_eval.models.rows import RAGGED_MIN_LENGTH

    def mixable(lengths, chunk=20):  # can_share_padded_pass for a model without attention layers
        return [RAGGED_MIN_LENGTH <= n <= chunk for n in lengths]

    lengths = [5, 9, 9, 17, 4, 12, 2, 40, 9]
    groups = prefill_groups(lengths, 3, mixable=mixable(lengths))
    assert groups == [[7], [3, 5], [1, 2, 8], [0, 4], [6]]  # 40 > chunk, 2 < RAGGED_MIN_LENGTH alone
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = lengths[g[0]]
        assert len(g) <= 3 and width == max(lengths[i] for i in g)
        assert len(g) * width <= MAX_PADDING_RATIO * sum(lengths[i] for i in g)
    assert prefill_groups(lengths, 3, mixable=[False] * len(lengths)) == [[7], [3], [5], [1, 2, 8], [0], [4], [6]]
    assert prefill_groups([8] * 5, 2, mixable=mixable([8] * 5)) == [[0, 1], [2, 3], [4]]


@torch.inference_mode()
def test_hybrid_models_keep_prefills_of_one_length(monkeypatch, one_torch_thread):
    """An attention layer's key/value cache would hold the padding: a hybrid model prefills only
    prompts of equal length together, and its greedy tokens equal each prompt alone."""
    from mamba_eval.models.config import AttnConfig, mamba_stack
    from mamba_eval.models.model import LanguageModel

    torch.manual_seed(0)
    config = mamba_stack(arch="mamba2", d_model=32, n_layer=2, vocab_size=64, d_state=8, d_conv=4, expand=2,
                         headdim=16, ngroups=1, chunk_size=8, attn_layer_idx=(1,),
                         attn=AttnConfig(num_heads=2, num_heads_kv=1, head_dim=16))
    hybrid = LanguageModel(config, dtype=torch.float32)
    with torch.no_grad():  # a spread-out output distribution: no near-ties between greedy candidates
        hybrid.backbone.embedding.weight.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (6, 9, 6, 5)]
    cpu = torch.device("cpu")
    calls = _counting_forwards(hybrid, monkeypatch)
    together = generate(hybrid, prompts, max_new_tokens=5, device=cpu, batch_size=4)
    assert calls == [(1, 9, False), (2, 6, False), (1, 5, False)]
    assert together == [generate(hybrid, [p], max_new_tokens=5, device=cpu)[0] for p in prompts]


@torch.inference_mode()
def test_invariant_decode_steps_do_not_depend_on_the_batch(checkpoint):
    """Under an enabled batch-invariance policy on the CPU, decoding steps run on filler rows
    (``Invariance.step_rows``): a prompt's logits at every step are the same bits whether it
    decodes alone or beside 2 or 6 other sequences, and equal the plain model's to rounding; its
    greedy tokens through ``generate`` are the same at batch sizes 1, 3 and 7."""
    from helpers import assert_close
    from mamba_eval.harness.generation import DecodeRunner

    for name in ("mamba1-tiny", "mamba2-small"):
        path = checkpoint(name).ssm_dir
        invariant = load_model(path, dtype="float32", device="cpu", batch_invariant=True)
        plain = load_model(path, dtype="float32", device="cpu", batch_invariant=False)
        assert invariant.invariance.pads_batches and not plain.invariance.pads_batches
        vocab = invariant.config.vocab_size
        gen = torch.Generator().manual_seed(8)
        steps = 6
        tokens = torch.randint(2, vocab, (7, steps), generator=gen)  # row 0: the prompt followed
        logits = {}
        for batch in (1, 3, 7):
            runner = DecodeRunner(invariant, batch)
            logits[batch] = torch.stack([runner.run(tokens[:batch, t])[0] for t in range(steps)])
        assert torch.equal(logits[3], logits[1]) and torch.equal(logits[7], logits[1]), name
        runner = DecodeRunner(plain, 7)
        reference = torch.stack([runner.run(tokens[:, t])[0] for t in range(steps)])
        assert_close(logits[1], reference, 1e-4)

        prompts = [tokens[0, :5].tolist()] + [torch.randint(2, vocab, (n,), generator=gen).tolist()
                                               for n in (5, 3, 8, 5, 12, 4)]
        outs = {b: generate(invariant, prompts[:b], max_new_tokens=6, device=torch.device("cpu"), batch_size=b)[0]
                for b in (1, 3, 7)}
        assert outs[1] == outs[3] == outs[7], name
