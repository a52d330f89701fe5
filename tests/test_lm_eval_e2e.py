"""End to end through lm-eval on real task data and the real GPT-NeoX-20B tokenizer:
``--model mamba`` and lm-eval's own ``--model hf`` (transformers' Mamba classes) on the same
random-init checkpoint must agree sample by sample.

``MAMBA_EVAL_E2E_DOCS=full`` runs the whole document sets instead of the first 120 of each task
(20,676 documents; 21 minutes on 2 CPU cores)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_same_lm_eval_run
from helpers_data import require_data_dir

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

VOCAB_ROWS = 50280  # GPT-NeoX-20B's 50277 tokens padded to a multiple of 8, as the releases do


def _save(model, out_dir, embedding: str, routers: bool = False):
    """Spread the output distribution (the embedding; the routers, so that the experts' choice
    varies) so that ranking answers depends on the model, and save it."""
    with torch.no_grad():
        getattr(model.model, embedding).weight.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if routers and "router" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def _write_checkpoint(out_dir, arch: str):
    torch.manual_seed(0)
    if arch == "mamba1":
        cfg = transformers.MambaConfig(
            vocab_size=VOCAB_ROWS, hidden_size=64, num_hidden_layers=2, state_size=8,
            expand=2, conv_kernel=4, residual_in_fp32=True, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = transformers.MambaForCausalLM(cfg)
    elif arch == "bamba":  # a hybrid in transformers' own format: Mamba-2, attention, gated MLPs
        cfg = transformers.BambaConfig(
            vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
            mamba_d_state=16, mamba_chunk_size=32, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
            pad_token_id=0,
        )
        return _save(transformers.BambaForCausalLM(cfg), out_dir, "embed_tokens")
    elif arch == "nemotron_h":  # one sublayer per block: Mamba-2, attention without positions, squared-ReLU MLP
        cfg = transformers.NemotronHConfig(
            vocab_size=VOCAB_ROWS, hidden_size=64, hybrid_override_pattern="M*-M", num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
            n_groups=2, chunk_size=32, intermediate_size=96, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return _save(transformers.NemotronHForCausalLM(cfg), out_dir, "embeddings")
    elif arch == "falcon_h1":  # attention and Mamba-2 side by side in every block, µP multipliers
        cfg = transformers.FalconH1Config(
            vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
            mamba_d_state=16, mamba_chunk_size=32, mamba_rms_norm=True, mamba_norm_before_gate=False,
            embedding_multiplier=2.0, lm_head_multiplier=0.5, key_multiplier=0.7, ssm_in_multiplier=1.3,
            ssm_multipliers=[0.5, 1.5, 1.0, 0.8, 2.0], mlp_multipliers=[1.2, 0.8], tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return _save(transformers.FalconH1ForCausalLM(cfg), out_dir, "embed_tokens")
    elif arch == "jamba":  # Mamba-1 with weighted Δ/B/C norms, attention, experts every other layer
        cfg = transformers.JambaConfig(
            vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
            mamba_d_state=16, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return _save(transformers.JambaForCausalLM(cfg), out_dir, "embed_tokens", routers=True)
    elif arch == "granite":  # Granite 4.0-H: mixture of experts, multipliers, attention without rotary
        cfg = transformers.GraniteMoeHybridConfig(
            vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16,
            mamba_d_state=16, mamba_chunk_size=32, num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=48, embedding_multiplier=4.0, residual_multiplier=0.5,
            attention_multiplier=0.25, logits_scaling=2.0, position_embedding_type="nope",
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return _save(transformers.GraniteMoeHybridForCausalLM(cfg), out_dir, "embed_tokens", routers=True)
    elif arch == "zamba2":  # Mamba-2 and two shared transformer blocks, each use with its own adapters
        cfg = transformers.Zamba2Config(
            vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            layers_block_type=["mamba", "hybrid", "hybrid"], mamba_d_state=16, n_mamba_heads=8,
            chunk_size=32, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return _save(transformers.Zamba2ForCausalLM(cfg), out_dir, "embed_tokens")
    else:
        cfg = transformers.Mamba2Config(
            vocab_size=VOCAB_ROWS, hidden_size=64, num_hidden_layers=2, state_size=16,
            expand=2, conv_kernel=4, head_dim=16, num_heads=8, n_groups=1, chunk_size=32,
            residual_in_fp32=True, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = transformers.Mamba2ForCausalLM(cfg)
    # Spread the output distribution so that ranking answers depends on the model.
    with torch.no_grad():
        model.backbone.embeddings.weight.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def offline_tasks():
    data_dir = require_data_dir()
    from mamba_eval.harness.offline import prepare_offline_tasks

    return prepare_offline_tasks(data_dir)


def _run(model_name, ckpt, tok_dir, tasks, limit, include_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = f"pretrained={ckpt},tokenizer={tok_dir},dtype=float32"
    return simple_evaluate(
        model=model_name, model_args=args, tasks=tasks, limit=limit, device="cpu",
        batch_size=4, task_manager=TaskManager(include_path=str(include_path)),
        log_samples=True, bootstrap_iters=0,
    )


@pytest.mark.parametrize(
    "arch,tasks,limit",
    [
        # The five tasks whose accuracies the engine must reproduce (winogrande: one continuation
        # after two different contexts; arc_easy: 3-5 choices), 120 documents each.
        ("mamba1", ["hellaswag", "piqa", "lambada_openai", "arc_easy", "winogrande"], 120),
        # Whole documents, several 2048-token windows each: two are enough.
        ("mamba1", ["wikitext"], 2),
        ("mamba2", ["hellaswag", "piqa", "lambada_openai", "arc_easy", "winogrande"], 120),
        ("bamba", ["hellaswag", "lambada_openai"], 24),
        ("granite", ["hellaswag", "lambada_openai"], 24),
        ("nemotron_h", ["hellaswag", "lambada_openai"], 24),
        ("falcon_h1", ["hellaswag", "lambada_openai"], 24),
        ("jamba", ["hellaswag", "lambada_openai"], 24),
        ("zamba2", ["hellaswag", "lambada_openai"], 24),
    ],
)
def test_mamba_equals_hf(tmp_path, offline_tasks, arch, tasks, limit):
    if os.environ.get("MAMBA_EVAL_E2E_DOCS") == "full" and tasks != ["wikitext"]:
        limit = None
    tok_dir = require_data_dir() / "tokenizers" / "gpt-neox-20b"
    ckpt = _write_checkpoint(tmp_path / arch, arch)
    ours = _run("mamba", ckpt, tok_dir, tasks, limit, offline_tasks)
    theirs = _run("hf", ckpt, tok_dir, tasks, limit, offline_tasks)
    for task in tasks:
        assert_same_lm_eval_run(ours, theirs, task)
