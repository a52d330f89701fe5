"""mamba_ssm's hybrid models: attention layers and gated MLPs between Mamba layers.

Two tiny checkpoints in the mamba_ssm dialect (``config.json`` with ``attn_layer_idx``,
``attn_cfg``, ``d_intermediate``; ``pytorch_model.bin``), both written here without our loader:

- ``bamba``: transformers' ``BambaForCausalLM`` (Mamba-2 layers, grouped-query attention with
  rotary embedding on half of each head, a gated MLP in every layer: the structure of mamba_ssm's
  ``mamba2attn`` models) with its weights renamed to mamba_ssm's keys. Our logits must equal
  transformers' — an implementation nobody here wrote.
- ``mha``: random weights for every option of mamba_ssm's ``MHA`` that Bamba lacks: a causal conv
  over q/k/v, a parallel MLP inside the attention (``mlp_dim``, rounded up to 256), interleaved
  rotary embedding with another base, one shared key/value head, biases, an explicit softmax
  scale; Mamba-1 layers, LayerNorm, ``d_intermediate`` rounded up to 128, an attention layer
  first. The attention layer is checked against a reference written here from plain
  ``scaled_dot_product_attention`` and complex-number rotations, and the whole model against a
  reference forward built from those pieces.

On both: forward from a state equals one forward (conv, SSM and key/value caches carried),
forked states continue each row, step-by-step decoding (from zero, and after a prefill copied
into a larger preallocated cache, with rows compacted as a decoder does) equals one forward,
and the scoring engine's shared contexts and stateful rolling give the scores of whole forwards.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, rel_max_error
from mamba_eval.models.mixers.attention import AttnState
from mamba_eval.models.checkpoint import CheckpointError, load_model, read_config
from mamba_eval.models.model import LanguageModel
from mamba_eval.models.state import SSMState

transformers = pytest.importorskip("transformers")

LENGTH = 27
PIECES = (10, 1, 16)


# ----------------------------------------------------------------------------- checkpoints

BAMBA = dict(vocab_size=112, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
             mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=16, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _write_mamba_ssm(folder, config: dict, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    torch.save(state, folder / "pytorch_model.bin")


@torch.no_grad()
def _bamba(folder):
    """transformers' Bamba, perturbed off its constant initial values, saved in mamba_ssm's dialect."""
    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(transformers.BambaConfig(**BAMBA)).eval()
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * noise)
        elif name.endswith((".D", "dt_bias", "A_log")):
            p.add_(0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif name.endswith("embed_tokens.weight"):
            p.copy_(0.5 * noise)
    sd = model.state_dict()
    out = {"backbone.embedding.weight": sd["model.embed_tokens.weight"],
           "backbone.norm_f.weight": sd["model.final_layernorm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(BAMBA["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"backbone.layers.{i}."
        out[dst + "norm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "norm2.weight"] = sd[src + "pre_ff_layernorm.weight"]
        ff = src + "feed_forward."
        # mamba_ssm's GatedMLP: [y; gate] = fc1(x), fc2(y * silu(gate)); Bamba's: down(silu(gate(x)) * up(x)).
        out[dst + "mlp.fc1.weight"] = torch.cat([sd[ff + "up_proj.weight"], sd[ff + "gate_proj.weight"]])
        out[dst + "mlp.fc2.weight"] = sd[ff + "down_proj.weight"]
        if i in BAMBA["attn_layer_indices"]:
            at = src + "self_attn."
            out[dst + "mixer.in_proj.weight"] = torch.cat([sd[at + f"{n}_proj.weight"] for n in "qkv"])
            out[dst + "mixer.out_proj.weight"] = sd[at + "o_proj.weight"]
        else:
            for key, value in sd.items():
                if key.startswith(src + "mamba."):
                    out[dst + "mixer." + key[len(src + "mamba."):]] = value
    head_dim = BAMBA["hidden_size"] // BAMBA["num_attention_heads"]
    config = {
        "d_model": BAMBA["hidden_size"], "d_intermediate": BAMBA["intermediate_size"],
        "n_layer": BAMBA["num_hidden_layers"], "vocab_size": 100,  # padded to 112 rows
        "ssm_cfg": {"layer": "Mamba2", "d_state": BAMBA["mamba_d_state"], "d_conv": BAMBA["mamba_d_conv"],
                    "expand": 2, "headdim": BAMBA["mamba_d_head"], "ngroups": BAMBA["mamba_n_groups"],
                    "chunk_size": BAMBA["mamba_chunk_size"]},
        "attn_layer_idx": BAMBA["attn_layer_indices"],
        "attn_cfg": {"causal": True, "num_heads": BAMBA["num_attention_heads"],
                     "num_heads_kv": BAMBA["num_key_value_heads"], "head_dim": head_dim,
                     "rotary_emb_dim": head_dim // 2,  # Bamba rotates half of each head
                     "qkv_proj_bias": False, "out_proj_bias": False},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
        "tie_embeddings": False,
    }
    _write_mamba_ssm(folder, config, {k: v.clone() for k, v in out.items()})
    return model


MHA_CONFIG = {
    "d_model": 32, "d_intermediate": 50, "n_layer": 3, "vocab_size": 61, "ssm_cfg": {"d_state": 4},
    "attn_layer_idx": [0, 2],
    "attn_cfg": {"causal": True, "num_heads": 4, "num_heads_kv": 1, "head_dim": 12, "rotary_emb_dim": 8,
                 "rotary_emb_base": 500.0, "rotary_emb_interleaved": True, "d_conv": 3, "mlp_dim": 40,
                 "softmax_scale": 0.2},  # qkv_proj_bias / out_proj_bias: MHA's default, true
    "rms_norm": False, "residual_in_fp32": True, "fused_add_norm": False, "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
D, V, DI, MLP_HIDDEN, MHA_MLP = 32, 64, 64, 128, 256  # d_model, padded vocab, d_inner, rounded widths
H, HKV, P, QKV = 4, 1, 12, 12 * (4 + 2)


def _mha_shapes() -> dict[str, tuple[int, ...]]:
    """mamba_ssm's parameter names and shapes for MHA_CONFIG (from MixerModel, Block, MHA, Mamba, GatedMLP)."""
    shapes = {"backbone.embedding.weight": (V, D), "backbone.norm_f.weight": (D,), "backbone.norm_f.bias": (D,)}
    n, r = 4, math.ceil(D / 16)
    for i in range(3):
        p = f"backbone.layers.{i}."
        for norm in ("norm", "norm2"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (D,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc2.weight"] = (2 * MLP_HIDDEN, D), (D, MLP_HIDDEN)
        if i in (0, 2):
            shapes.update({p + "mixer.in_proj.weight": (QKV + MHA_MLP, D), p + "mixer.in_proj.bias": (QKV + MHA_MLP,),
                           p + "mixer.conv1d.weight": (QKV, 1, 3), p + "mixer.conv1d.bias": (QKV,),
                           p + "mixer.out_proj.weight": (D, H * P + MHA_MLP // 2), p + "mixer.out_proj.bias": (D,)})
        else:
            shapes.update({p + "mixer.in_proj.weight": (2 * DI, D), p + "mixer.conv1d.weight": (DI, 1, 4),
                           p + "mixer.conv1d.bias": (DI,), p + "mixer.x_proj.weight": (r + 2 * n, DI),
                           p + "mixer.dt_proj.weight": (DI, r), p + "mixer.dt_proj.bias": (DI,),
                           p + "mixer.A_log": (DI, n), p + "mixer.D": (DI,), p + "mixer.out_proj.weight": (D, DI)})
    return shapes


def _mha(folder) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    state = {}
    for name, shape in _mha_shapes().items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith("A_log"):
            value = torch.log(torch.arange(1, shape[1] + 1.0)).expand(shape) + 0.1 * noise
        elif name.endswith("dt_proj.bias"):
            value = torch.log(torch.expm1(torch.empty(shape).uniform_(1e-3, 0.1, generator=gen)))
        elif name.endswith((".D", "norm.weight", "norm2.weight", "norm_f.weight")):
            value = 1 + 0.3 * noise
        elif name.endswith("bias") or name == "backbone.embedding.weight":
            value = (0.2 if name.endswith("bias") else 0.7) * noise
        else:
            value = noise / math.sqrt(math.prod(shape[1:]))
        state[name] = value.contiguous()
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()  # mamba_ssm stores it, though tied
    _write_mamba_ssm(folder, MHA_CONFIG, state)
    return state


@pytest.fixture(scope="module")
def hybrids(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrids")
    bamba = _bamba(root / "bamba")
    weights = _mha(root / "mha")
    return {"bamba": (root / "bamba", load_model(str(root / "bamba")), bamba),
            "mha": (root / "mha", load_model(str(root / "mha")), weights)}


@pytest.fixture(params=["bamba", "mha"])
def hybrid(request, hybrids):
    return hybrids[request.param][1]


def _ids(vocab: int, batch=2, length=LENGTH, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references


def _rotate_ref(x: torch.Tensor, dim: int, base: float, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x [B, L, heads, P] by complex multiplication, in float64: pair i of the
    first ``dim`` channels (i, i + dim/2), or (2i, 2i + 1) when interleaved, turns by position * base^(-2i/dim)."""
    L = x.shape[1]
    x = x.double()
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        pairs = rot.unflatten(-1, (dim // 2, 2))
    else:
        pairs = torch.stack((rot[..., : dim // 2], rot[..., dim // 2:]), dim=-1)
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    turn = torch.polar(torch.ones(L, dim // 2, dtype=torch.float64), torch.arange(L).double()[:, None] * theta)
    z = torch.view_as_complex(pairs.contiguous()) * turn[:, None, :]
    out = torch.view_as_real(z)
    out = out.flatten(-2) if interleaved else torch.cat((out[..., 0], out[..., 1]), dim=-1)
    return torch.cat((out, rest), dim=-1)


def _attention_ref(w: dict, prefix: str, x: torch.Tensor, cfg: dict, d_model: int) -> torch.Tensor:
    """mamba_ssm's MHA on x [B, L, D] in float64, from the weights under ``prefix`` (mixer.)."""
    heads, kv_heads = cfg["num_heads"], cfg.get("num_heads_kv", cfg["num_heads"])
    head_dim = cfg.get("head_dim", d_model // heads)
    qkv_dim = head_dim * (heads + 2 * kv_heads)
    g = {k[len(prefix):]: v.double() for k, v in w.items() if k.startswith(prefix)}
    proj = F.linear(x.double(), g["in_proj.weight"], g.get("in_proj.bias"))
    qkv, mlp = proj[..., :qkv_dim], proj[..., qkv_dim:]
    if mlp.shape[-1]:
        up, gate = mlp.chunk(2, dim=-1)
        mlp = up * F.silu(gate)
    if cfg.get("d_conv", 0):
        k = cfg["d_conv"]
        padded = F.pad(qkv.transpose(1, 2), (k - 1, 0))
        qkv = F.conv1d(padded, g["conv1d.weight"], g["conv1d.bias"], groups=qkv_dim).transpose(1, 2)
    B, L, _ = x.shape
    q = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))
    k = qkv[..., heads * head_dim: (heads + kv_heads) * head_dim].unflatten(-1, (kv_heads, head_dim))
    v = qkv[..., (heads + kv_heads) * head_dim:].unflatten(-1, (kv_heads, head_dim))
    if cfg.get("rotary_emb_dim", 0):
        args = (cfg["rotary_emb_dim"], cfg.get("rotary_emb_base", 10000.0), cfg.get("rotary_emb_interleaved", False))
        q, k = _rotate_ref(q, *args), _rotate_ref(k, *args)
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=cfg.get("softmax_scale"))
    ctx = ctx.transpose(1, 2).reshape(B, L, heads * head_dim)
    if mlp.shape[-1]:
        ctx = torch.cat([ctx, mlp], dim=-1)
    return F.linear(ctx, g["out_proj.weight"], g.get("out_proj.bias"))


def _mlp_ref(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    y, gate = F.linear(x.double(), w[prefix + "fc1.weight"].double()).chunk(2, dim=-1)
    return F.linear(y * F.silu(gate), w[prefix + "fc2.weight"].double())


# ----------------------------------------------------------------------------- tests


def test_reads_the_hybrid_configs(hybrids):
    cfg = hybrids["mha"][1].config
    a = cfg.mixers("attention")[0]
    assert (cfg.kinds, cfg.layer_indices("attention"), cfg.layers[0].mlp.d_intermediate, cfg.rms_norm) == (
        ("attention", "mamba1"), (0, 2), MLP_HIDDEN, False)
    assert (a.num_heads, a.num_heads_kv, a.head_dim, a.d_conv, a.mlp_dim) == (H, HKV, P, 3, MHA_MLP)
    assert (a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, a.scale) == (8, 500.0, True, 0.2)
    assert a.qkv_proj_bias and a.out_proj_bias  # MHA's defaults
    cfg = hybrids["bamba"][1].config
    a = cfg.mixers("attention")[0]
    assert (cfg.kinds, cfg.layer_indices("attention"), cfg.layers[0].mlp.d_intermediate, cfg.vocab_size) == (
        ("mamba2", "attention"), (1, 3), 128, 112)
    assert (a.num_heads_kv, a.rotary_emb_dim, a.scale) == (2, 8, 16 ** -0.5)


def test_bamba_logits_match_transformers(hybrids):
    _, ours, theirs = hybrids["bamba"]
    ids = _ids(112)
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
    assert expected.std() > 0.1
    assert_close(ours(ids)[0], expected, rtol_max=1e-4, name="hybrid vs BambaForCausalLM")


def test_attention_layer_matches_reference(hybrids):
    _, model, weights = hybrids["mha"]
    x = torch.randn(3, 19, D, generator=torch.Generator().manual_seed(3))
    out, state = model.backbone.layers[2].mixer(x)
    expected = _attention_ref(weights, "backbone.layers.2.mixer.", x, MHA_CONFIG["attn_cfg"], D)
    assert_close(out, expected, rtol_max=1e-5, name="attention vs SDPA reference")
    assert isinstance(state, AttnState) and state.filled() == 19 and state.k.shape == (3, HKV, 19, P)
    # Sensitivity: the reference without rotation is far off.
    plain = {**MHA_CONFIG["attn_cfg"], "rotary_emb_dim": 0}
    assert rel_max_error(out, _attention_ref(weights, "backbone.layers.2.mixer.", x, plain, D)) > 1e-2


def test_mha_model_matches_reference_forward(hybrids):
    """The whole model against a forward built from the references (Mamba-1 layers: our mixer,
    checked against transformers elsewhere), with LayerNorms and mamba_ssm's block order."""
    _, model, w = hybrids["mha"]
    ids = _ids(61, seed=4)

    def ln(x, name):
        return F.layer_norm(x, (D,), w[name + ".weight"].double(), w[name + ".bias"].double(), eps=1e-5)

    h, residual = w["backbone.embedding.weight"].double()[ids], None
    for i, layer in enumerate(model.backbone.layers):
        p = f"backbone.layers.{i}."
        residual = h if residual is None else h + residual
        x = ln(residual, p + "norm")
        if i in (0, 2):
            h = _attention_ref(w, p + "mixer.", x, MHA_CONFIG["attn_cfg"], D)
        else:
            h = layer.mixer(x.float())[0].double()
        residual = h + residual
        h = _mlp_ref(w, p + "mlp.", ln(residual, p + "norm2"))
    expected = F.linear(ln(h + residual, "backbone.norm_f"), w["backbone.embedding.weight"].double())
    assert_close(model(ids)[0], expected, rtol_max=1e-5, name="hybrid vs reference forward")


def test_state_passing_equals_one_forward(hybrid):
    ids = _ids(hybrid.config.vocab_size, seed=5)
    full, final = hybrid(ids, return_state=True)
    pieces, stateless, state = [], [], None
    for chunk in ids.split(PIECES, dim=1):
        logits, state = hybrid(chunk, state=state, return_state=True)
        pieces.append(logits)
        stateless.append(hybrid(chunk)[0])
    assert_close(torch.cat(pieces, dim=1), full, rtol_max=1e-5, name="chained logits")
    for i in hybrid.config.layer_indices("attention"):
        assert state[i].filled() == LENGTH
        assert_close(state[i].k, final[i].k, rtol_max=1e-5, name=f"layer {i} keys")
        assert_close(state[i].v, final[i].v, rtol_max=1e-5, name=f"layer {i} values")
    assert rel_max_error(torch.cat(stateless, dim=1), full) > 1e-3  # the state matters


def test_forked_states_continue_each_sequence(hybrid):
    vocab = hybrid.config.vocab_size
    prefix, suffix = _ids(vocab, batch=2, length=9, seed=6), _ids(vocab, batch=3, length=6, seed=7)
    _, state = hybrid(prefix, return_state=True)
    rows = [1, 0, 1]
    forked = [s.index_select(rows) for s in state]
    snapshot = [s.clone() for s in forked]
    logits, _ = hybrid(suffix, state=forked)
    for a, b in zip(forked, snapshot):  # forward reads the state, never writes it
        for name in ("k", "v", "length", "conv") if isinstance(a, AttnState) else ("conv", "ssm"):
            assert (getattr(a, name) is None) or torch.equal(getattr(a, name), getattr(b, name))
    expected, _ = hybrid(torch.cat([prefix[rows], suffix], dim=1))
    assert_close(logits, expected[:, prefix.shape[1]:], rtol_max=1e-5)


def test_step_decoding_equals_one_forward(hybrid):
    ids = _ids(hybrid.config.vocab_size, seed=8)
    full, _ = hybrid(ids)
    state = hybrid.allocate_state(2, max_length=LENGTH)
    stepped = torch.stack([hybrid.step(ids[:, t], state) for t in range(LENGTH)], dim=1)
    assert_close(stepped, full, rtol_max=1e-5, name="step from zeros")
    with pytest.raises(ValueError, match="key/value cache is full"):
        hybrid.step(ids[:, 0], state)


def test_decoder_buffers_prefill_and_compaction(hybrid):
    """As a decoder uses them: a prefill state copied into the leading rows of a larger,
    longer preallocated cache; steps on views of those rows; finished rows compacted away."""
    ids = _ids(hybrid.config.vocab_size, batch=3, seed=9)
    full, _ = hybrid(ids)
    prefill = 12
    _, state = hybrid(ids[:, :prefill], return_state=True)
    buffers = hybrid.allocate_state(5, max_length=LENGTH + 4)
    for buf, layer in zip(buffers, state):
        buf.rows(3).copy_(layer)
    live = [0, 1, 2]
    for t in range(prefill, LENGTH):
        if t == 20:  # sequence 1 finishes: move rows 0 and 2 to the front
            keep = [0, 2]
            for buf in buffers:
                buf.rows(2).copy_(buf.index_select(keep))
            live = [live[k] for k in keep]
        logits = hybrid.step(ids[live, t], [buf.rows(len(live)) for buf in buffers])
        assert_close(logits, full[live, t], rtol_max=1e-5, name=f"position {t}")
    for buf in buffers:
        buf.zero_()
    assert all(int(b.length) == 0 for b in buffers if isinstance(b, AttnState))


def test_state_errors(hybrid):
    with pytest.raises(ValueError, match="needs the number of positions"):
        hybrid.allocate_state(2)
    plain = [SSMState(torch.zeros(2, 1, 1), torch.zeros(2, 1, 1)) for _ in range(hybrid.config.n_layer)]
    with pytest.raises(ValueError, match=r"state of layer \d is a SSMState, the layer needs a AttnState"):
        hybrid(_ids(hybrid.config.vocab_size, length=3), state=plain)
    small = hybrid.allocate_state(2, max_length=4)
    _, big = hybrid(_ids(hybrid.config.vocab_size, length=6), return_state=True)
    attn = hybrid.config.layer_indices("attention")[0]
    with pytest.raises(ValueError, match="6 cached positions do not fit a cache of 4"):
        small[attn].copy_(big[attn])


def test_engine_scores_equal_whole_forwards(hybrid):
    """The scoring engine forks attention caches with the SSM states: shared contexts and the
    stateful rolling mode give the scores of whole-sequence forwards."""
    from mamba_eval.harness.engine import score_continuations, score_documents

    vocab = hybrid.config.vocab_size
    gen = torch.Generator().manual_seed(10)
    contexts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (7, 7, 11)]
    requests = [(contexts[c], torch.randint(1, vocab, (n,), generator=gen).tolist())
                for c, n in ((0, 3), (0, 1), (0, 5), (1, 2), (1, 4), (2, 3), (2, 3))]
    cpu = torch.device("cpu")
    kwargs = dict(max_length=64, batch_size=4, device=cpu)
    shared = score_continuations(hybrid, requests, share_context=True, **kwargs)
    whole = score_continuations(hybrid, requests, share_context=False, **kwargs)
    for (a, ga), (b, gb) in zip(shared, whole):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) and ga == gb
    docs = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (23, 9, 16)]
    rolled = score_documents(hybrid, docs, prefix_token=0, chunk_length=5, batch_size=2, device=cpu)
    for doc, score in zip(docs, rolled):
        logprobs = torch.log_softmax(hybrid(torch.tensor([[0] + doc[:-1]]))[0][0], dim=-1)
        assert math.isclose(score, logprobs[torch.arange(len(doc)), doc].sum().item(), rel_tol=1e-5)


def test_triton_backend_matches_reference(hybrids):
    """The hybrid on the Triton kernels (the attention's q/k/v conv is our conv kernel without
    activation; interpreted on the CPU, in bf16 on a GPU) equals the reference backend."""
    folder, ref, _ = hybrids["mha"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    tol = 2e-2 if device == "cuda" else 1e-4
    if device == "cuda":
        ref = load_model(str(folder), dtype=dtype, device=device)
    tri = load_model(str(folder), dtype=dtype, device=device, backend="triton")
    ids = _ids(61, batch=1, length=10, seed=11).to(device)
    expected, _ = ref(ids)
    _, state = tri(ids[:, :7], return_state=True)
    assert_close(tri(ids)[0], expected, rtol_max=tol, name="triton forward")
    big = tri.allocate_state(1, max_length=10)
    for buf, layer in zip(big, state):
        buf.copy_(layer)
    stepped = torch.stack([tri.step(ids[:, t], big) for t in range(7, 10)], dim=1)
    assert_close(stepped, expected[:, 7:], rtol_max=tol, name="triton step")


def test_greedy_generation_equals_full_forward(hybrid):
    from mamba_eval.harness.generation import generate

    prompts = _ids(hybrid.config.vocab_size, batch=3, length=6, seed=12).tolist()
    prompts[1] = prompts[1][:4]
    outs = generate(hybrid, prompts, max_new_tokens=5, batch_size=2, device=torch.device("cpu"))
    for prompt, out in zip(prompts, outs):
        seq = torch.tensor([prompt + out])
        logits, _ = hybrid(seq)
        assert out == logits[0, len(prompt) - 1:-1].argmax(-1).tolist()


# ----------------------------------------------------------------------------- configs


def test_published_hybrid_parameter_count():
    """mamba2attn-2.7b builds (meta device) with the parameter count of mamba_ssm's modules,
    counted here from their definitions."""
    from mamba_eval.models.releases import release_config

    cfg = release_config("mamba2attn-2.7b")
    d, di, n, heads = 2560, 5120, 128, 80
    conv_dim = di + 2 * n
    mamba2 = d * (2 * di + 2 * n + heads) + conv_dim * 5 + 3 * heads + di + di * d + d  # + the block norm
    qkv = 128 * 90
    mha = d * qkv + qkv * 5 + 3840 * d + d
    expected = 50288 * d + 58 * mamba2 + 6 * mha + d
    model = LanguageModel(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 2.6e9 < expected < 2.8e9


@pytest.mark.parametrize("change, match", [
    ({"attn_cfg": {}}, "'attn_cfg.num_heads' is required"),
    ({"attn_cfg": {"num_heads": 4}}, "'attn_cfg.causal' must be true"),
    ({"attn_cfg": {"num_heads": 4, "causal": True, "num_heads_kv": 3}}, "not a multiple of num_heads_kv = 3"),
    ({"attn_cfg": {"num_heads": 4, "causal": True, "rotary_emb_dim": 12, "head_dim": 8}}, "rotary_emb_dim must be"),
    ({"attn_cfg": {"num_heads": 4, "causal": True, "window_size": 8}}, "'attn_cfg.window_size' is not a known"),
    ({"attn_layer_idx": [3]}, "'attn_layer_idx' holds [3], outside the 3 layers"),
    ({"d_intermediate": -1}, "'d_intermediate' must be non-negative"),
])
def test_bad_hybrid_configs(tmp_path, change, match):
    (tmp_path / "config.json").write_text(json.dumps({**MHA_CONFIG, **change}))
    with pytest.raises(CheckpointError, match=match.replace("[", r"\[").replace("]", r"\]")):
        read_config(tmp_path)
