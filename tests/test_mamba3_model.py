"""Mamba-3 as a block of the architecture (models/mixers/mamba3.py), on the CPU:

- every published config builds with its parameter count;
- decoding step by step equals the forward; states passed piece by piece equal one pass; rows
  of a padded pass end in their own final states, bit for bit;
- the scoring engine's results are bit-identical across batch sizes and equal a naive forward;
- mamba_ssm's format and fla's load the same weights to the same logits; bad configs are
  refused with one line naming the field;
- a Llama-3-style tokenizer.json in the checkpoint folder is the one the lm-eval class uses.

There is no independent Mamba-3 implementation that runs on the CPU (mamba_ssm's and fla's
modules need CUDA kernels); tests/kernels/test_mamba3.py compares the SSM against mamba_ssm's
plain-PyTorch references where a source checkout is available.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_close
from mamba_eval.models.checkpoint import CheckpointError, load_model
from mamba_eval.models.config import Mamba3Config, mamba_stack
from mamba_eval.models.formats import config_from_dict
from mamba_eval.models.model import LanguageModel
from mamba_eval.models.releases import RELEASES, release_config
from mamba_eval.models.state import Mamba3State

CPU = torch.device("cpu")

# Parameter counts computed from mamba_ssm's module definitions (Mamba3, GatedMLP, Block, tied
# 128256-row embedding), independently of our modules: published counts exist only in the names.
PUBLISHED = {
    "mamba3-siso-187m": 186_849_600, "mamba3-siso-443m": 443_015_680, "mamba3-siso-893m": 892_782_336,
    "mamba3-siso-1.5b": 1_494_723_584, "mamba3-mimo-187m": 187_291_968, "mamba3-mimo-444m": 444_195_328,
    "mamba3-mimo-894m": 894_551_808, "mamba3-mimo-1.5b": 1_497_082_880,
}


def _mamba_ssm_count(d_model, n_layer, dff, rank, vocab=128256, N=128, P=64, S=32):
    """mamba_ssm's parameter count: in_proj (no bias), dt_bias, B/C biases [H, R, N], B/C norms [N],
    D, MIMO projections 3 [H, R, P], out_proj; GatedMLP fc1 [2 dff, D], fc2; two norms per block."""
    d_inner, heads = 2 * d_model, 2 * d_model // P
    in_proj = d_model * (2 * d_inner + 2 * N * rank + 3 * heads + S)
    mixer = in_proj + heads + 2 * heads * rank * N + 2 * N + heads + d_inner * d_model
    mixer += 3 * heads * rank * P if rank > 1 else 0
    return vocab * d_model + n_layer * (mixer + 3 * d_model * dff + 2 * d_model) + d_model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_build_with_their_parameter_count(name):
    raw = RELEASES[name]
    cfg = release_config(name)
    mixer, mlp = cfg.layers[0].mixer, cfg.layers[0].mlp
    assert isinstance(mixer, Mamba3Config) and mixer.is_mimo == ("mimo" in name)
    assert (mixer.d_state, mixer.headdim, mixer.n_angles, mixer.rank) == (128, 64, 32, 4 if "mimo" in name else 1)
    assert mlp.d_intermediate % 128 == 0 and cfg.vocab_size == 128256 and cfg.tie_embeddings
    model = LanguageModel(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    dff = -(-raw["d_intermediate"] // 128) * 128
    assert n == PUBLISHED[name] == _mamba_ssm_count(raw["d_model"], raw["n_layer"], dff, mixer.rank)
    size = float(name.split("-")[2][:-1]) * (1e9 if name.endswith("b") else 1e6)
    assert abs(n - size) <= (0.005 if name.endswith("m") else 0.01) * size  # the name's rounding


# ----------------------------------------------------------------------------- tiny models

TINY = {
    "siso": dict(d_state=16, headdim=16, ngroups=2, chunk_size=8),
    "mimo-norm": dict(d_state=16, headdim=8, ngroups=1, is_mimo=True, mimo_rank=3, chunk_size=4,
                      is_outproj_norm=True, rope_fraction=1.0, A_activation="heavy_tail"),
}


def _perturbed(model: LanguageModel, seed: int = 0) -> LanguageModel:
    """Every parameter moved off its initial value (ones, 1/R, ...), so a misplaced weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def _tiny(kind: str, *, d_intermediate=48, seed=0, batch_invariant=False, **top) -> LanguageModel:
    cfg = mamba_stack(arch="mamba3", mamba3=Mamba3Config(d_inner=64, **TINY[kind]), d_model=32, n_layer=2,
                      vocab_size=96, d_intermediate=d_intermediate, **top)
    torch.manual_seed(seed)
    return _perturbed(LanguageModel(cfg, batch_invariant=batch_invariant), seed)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_decoding_equals_forward(kind):
    model = _tiny(kind)
    ids = torch.randint(0, 96, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, _ = model(ids)
        state = model.allocate_state(3)
        assert all(isinstance(s, Mamba3State) for s in state)
        steps = torch.stack([model.step(ids[:, t], state) for t in range(ids.shape[1])], 1)
    assert_close(steps, logits, 1e-5, name="steps vs forward")


@pytest.mark.parametrize("kind", sorted(TINY))
def test_states_passed_in_pieces_equal_one_pass(kind):
    model = _tiny(kind, seed=2)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole, final = model.backbone_forward(ids, return_state=True)
        pieces, state = [], None
        for lo, hi in ((0, 1), (1, 11), (11, 30)):
            hidden, state = model.backbone_forward(ids[:, lo:hi], state=state, return_state=True)
            pieces.append(hidden)
        # forked copies resume the same way
        forked = [s.index_select([1, 1, 0]) for s in state]
        nxt = torch.randint(0, 96, (3, 4), generator=torch.Generator().manual_seed(4))
        from_fork, _ = model.backbone_forward(nxt, state=forked)
        direct, _ = model.backbone_forward(torch.cat([ids[[1, 1, 0]], nxt], 1))
    assert_close(torch.cat(pieces, 1), whole, 1e-5, name="hidden in pieces")
    for a, b in zip(state, final):
        for part in ("ssm", "k", "v"):
            assert_close(getattr(a, part), getattr(b, part), 1e-5, name=part)
    assert_close(from_fork, direct[:, 30:], 1e-5, name="from a forked state")


def test_padded_rows_end_in_their_own_state_bit_for_bit():
    """Rows of lengths 21, 9 and 4 in one right-padded pass: each row's hidden states and final
    state are the bits of the same batch cut at its length. As in test_lengths.py, one thread and
    64 rows keep the CPU libraries' dependence on the batch's size out of the comparison."""
    model = _tiny("mimo-norm", seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = torch.randint(0, 96, (64, 21), generator=torch.Generator().manual_seed(6))
        lengths = torch.tensor([21, 9, 4] * 21 + [9])
        with torch.inference_mode():
            hidden, state = model.backbone_forward(ids, return_state=True, lengths=lengths)
            for n in (21, 9, 4):
                cut, cut_state = model.backbone_forward(ids[:, :n], return_state=True)
                rows = (lengths == n).nonzero().flatten()
                assert torch.equal(hidden[rows, :n], cut[rows]), n
                for layer, mine in zip(state, cut_state):
                    for part in ("angle", "ssm", "k", "v"):
                        assert torch.equal(getattr(layer, part)[rows], getattr(mine, part)[rows]), (n, part)
            assert not torch.equal(state[0].ssm[1], cut_state[0].ssm[1])  # lengths did matter
    finally:
        torch.set_num_threads(threads)


def test_state_methods_act_on_all_four_tensors():
    model = _tiny("siso")
    state = model.allocate_state(4)[0]
    with torch.inference_mode():
        _, (filled, *_) = model.backbone_forward(torch.randint(0, 96, (4, 5)), return_state=True)
    state.copy_(filled)
    parts = ("angle", "ssm", "k", "v")
    assert all(torch.equal(getattr(state, p), getattr(filled, p)) for p in parts)
    picked = state.index_select([3, 0])
    assert all(torch.equal(getattr(picked, p), getattr(filled, p)[[3, 0]]) for p in parts)
    view = state.rows(2)
    view.zero_()
    assert all(not getattr(state, p)[:2].any() and torch.equal(getattr(state, p)[2:], getattr(filled, p)[2:])
               for p in parts)
    clone = state.clone().zero_()
    assert state.ssm[2:].any() and not clone.ssm.any()


def test_engine_scores_are_batch_invariant():
    """Token pairs with shared contexts of a few lengths: batch sizes 1, 7, 64 and a shuffled order
    give the same bits, and the scores equal one naive forward per request."""
    pytest.importorskip("lm_eval")
    from mamba_eval.harness.engine import EngineStats, score_continuations

    model = _tiny("mimo-norm", seed=7, batch_invariant=True)
    rng = random.Random(0)
    pairs = []
    for n_ctx in (5, 5, 5, 12, 12, 23, 3, 40):
        ctx = [rng.randrange(96) for _ in range(n_ctx)]
        pairs += [(ctx, [rng.randrange(96) for _ in range(rng.randrange(1, 4))]) for _ in range(3)]
    runs, calls = {}, {}
    for share in (True, False):
        for bs in (1, 7, 64):
            stats = EngineStats()
            runs[share, bs] = score_continuations(model, pairs, max_length=2048, batch_size=bs, device=CPU,
                                                  share_context=share, stats=stats)
            calls[share, bs] = stats.forward_calls
        assert runs[share, 7] == runs[share, 1] == runs[share, 64], share  # bit for bit
    assert len(set(calls.values())) > 1, calls  # the batch sizes did cut the work differently
    perm = list(range(len(pairs)))
    random.Random(1).shuffle(perm)
    shuffled = score_continuations(model, [pairs[i] for i in perm], max_length=2048, batch_size=7, device=CPU)
    assert [shuffled[perm.index(i)] for i in range(len(pairs))] == runs[True, 1]
    with torch.inference_mode():
        for (ctx, cont), (score, greedy) in zip(pairs, runs[True, 1]):
            logits, _ = model(torch.tensor([ctx + cont[:-1]]))
            logprobs = torch.log_softmax(logits[0, -len(cont):].double(), -1)
            want = logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            assert abs(score - want) <= 1e-4 * max(1.0, abs(want))
            assert greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


# ----------------------------------------------------------------------------- formats


def _write(folder: Path, config: dict, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("kind", sorted(TINY))
def test_both_formats_load_the_same_weights_to_the_same_logits(tmp_path, kind):
    """One set of weights written as mamba_ssm writes it (config with ssm_cfg, keys
    backbone.embedding, tied lm_head stored) and as fla's Mamba3ForCausalLM writes it (model_type
    mamba3, backbone.embeddings, untied lm_head, no MLP): same model, same logits."""
    model = _tiny(kind, d_intermediate=0, seed=8)
    mixer = model.config.layers[0].mixer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ssm_cfg = {"layer": "Mamba3", "d_state": mixer.d_state, "headdim": mixer.headdim, "ngroups": mixer.ngroups,
               "rope_fraction": mixer.rope_fraction, "is_mimo": mixer.is_mimo, "mimo_rank": mixer.mimo_rank,
               "chunk_size": mixer.chunk_size, "is_outproj_norm": mixer.is_outproj_norm,
               "A_activation": mixer.A_activation, "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4,
               "A_floor": 1e-4, "fuse_pregate_headwise_norm": True}
    ssm_dir = _write(tmp_path / "mamba_ssm", {
        "d_model": 32, "n_layer": 2, "vocab_size": 90, "pad_vocab_size_multiple": 16, "d_intermediate": 0,
        "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "tie_embeddings": True, "attn_layer_idx": [], "attn_cfg": {}}, state)
    fla_state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
    fla_dir = _write(tmp_path / "fla", {
        "architectures": ["Mamba3ForCausalLM"], "model_type": "mamba3", "hidden_size": 32, "num_hidden_layers": 2,
        "vocab_size": 96, "state_size": mixer.d_state, "head_dim": mixer.headdim, "n_groups": mixer.ngroups,
        "expand": 2, "num_heads": mixer.nheads, "rope_fraction": mixer.rope_fraction, "A_floor": 1e-4,
        "is_outproj_norm": mixer.is_outproj_norm, "is_mimo": mixer.is_mimo, "mimo_rank": mixer.mimo_rank,
        "chunk_size": mixer.chunk_size, "use_bias": False, "norm_eps": 1e-5, "hidden_act": "silu",
        "residual_in_fp32": True, "tie_word_embeddings": False, "A_activation": mixer.A_activation,
        "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "initializer_range": 0.02, "fuse_norm": True,
        "fuse_cross_entropy": True, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "transformers_version": "4.56.0", "torch_dtype": "float32"}, fla_state)
    ids = torch.randint(0, 90, (2, 13), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        want, _ = model(ids)
        for folder in (ssm_dir, fla_dir):
            loaded = load_model(folder, dtype="float32")
            assert loaded.config.layers[0].mixer == mixer, folder.name
            assert torch.equal(loaded(ids)[0], want), folder.name


BAD = [
    ({"ssm_cfg": {"layer": "Mamba3", "d_conv": 4}}, "field 'ssm_cfg.d_conv' is not a known Mamba3 setting"),
    ({"ssm_cfg": {"layer": "Mamba3", "rope_fraction": 0.25}}, "field 'ssm_cfg.rope_fraction' = 0.25 is not supported"),
    ({"ssm_cfg": {"layer": "Mamba3", "is_mimo": True, "d_state": 18}}, "field 'ssm_cfg.d_state' = 18 is not supported"),
    ({"ssm_cfg": {"layer": "Mamba3", "is_mimo": True, "mimo_rank": 0}}, "field 'ssm_cfg.mimo_rank' must be positive"),
    ({"ssm_cfg": {"layer": "Mamba3", "A_activation": "exp"}}, "field 'ssm_cfg.A_activation' = 'exp' is not supported"),
    ({"ssm_cfg": {"layer": "Mamba3", "headdim": 48}}, "field 'ssm_cfg.headdim' = 48 does not divide"),
    ({"model_type": "mamba3", "hidden_size": 32, "num_hidden_layers": 1, "mimo_ranks": 2},
     "field 'mimo_ranks' is not a known setting of fla's Mamba3Config"),
    ({"model_type": "mamba3", "hidden_size": 32, "num_hidden_layers": 1, "is_mimo": True, "state_size": 6},
     "field 'state_size' = 6 is not supported with MIMO"),
    ({"model_type": "mamba3", "hidden_size": 32, "num_hidden_layers": 1, "hidden_act": "gelu"},
     "field 'hidden_act' = 'gelu' (activation other than SiLU) is not supported"),
]


@pytest.mark.parametrize("fields, message", BAD)
def test_bad_configs_are_refused_naming_the_field(fields, message):
    raw = {"vocab_size": 96, **fields} if "model_type" in fields else {
        "d_model": 32, "n_layer": 1, "vocab_size": 96, **fields}
    with pytest.raises(CheckpointError) as info:
        config_from_dict(raw, Path("ckpt/config.json"))
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("ckpt/config.json: ")


# ----------------------------------------------------------------------------- tokenizer


def _llama3_style_tokenizer(folder: Path, texts) -> None:
    """A small byte-level BPE tokenizer.json in the Llama-3 layout: special tokens
    <|begin_of_text|> / <|end_of_text|>, BOS prepended by the post-processor, with its
    tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=80, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id(specials[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", pair=f"{specials[0]} $A $B:1",
                                                       special_tokens=[(specials[0], bos)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": specials[0], "eos_token": specials[1], "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048}))


def test_tokenizer_comes_from_the_checkpoint_folder(tmp_path):
    pytest.importorskip("lm_eval")
    from mamba_eval.harness.lm import MambaLM
    from mamba_eval.models.releases import release, write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "m3", release(
        "mamba3-siso-187m", d_model=32, n_layer=1, d_intermediate=64, vocab_size=400,
        ssm_cfg={"layer": "Mamba3", "d_state": 16, "headdim": 16, "chunk_size": 8}))
    texts = ["the quick brown fox jumps over the lazy dog", "a Mamba-3 state rotates", "hello world"] * 20
    _llama3_style_tokenizer(folder, texts)
    lm = MambaLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=2)
    assert lm.tokenizer.convert_ids_to_tokens(lm.prefix_token_id) == "<|begin_of_text|>"
    from lm_eval.api.instance import Instance
    from tokenizers import Tokenizer

    own = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert lm.tokenizer("hello world")["input_ids"] == own.encode("hello world").ids  # BOS first

    reqs = [Instance("loglikelihood", {}, ("the quick brown", " fox"), 0),
            Instance("loglikelihood", {}, ("hello", " world"), 1)]
    scores = lm.loglikelihood(reqs)
    assert len(scores) == 2 and all(np.isfinite(s) and s < 0 for s, _ in scores)
