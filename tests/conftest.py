"""Shared fixtures: tiny random-init checkpoints written by transformers, in both formats we read.

Every checkpoint is made by transformers' own ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (an
implementation written independently of ours), saved with ``save_pretrained`` (transformers
format), and converted to the mamba_ssm format (``config.json`` with ``d_model, n_layer, ssm_cfg,
pad_vocab_size_multiple, ...`` and a ``pytorch_model.bin`` with ``backbone.embedding.*`` keys and a
stored ``lm_head.weight``). The conversion below is written from the mamba_ssm format itself and
does not use ``mamba_eval.models.checkpoint``.

``checkpoint(name)`` returns a ``Checkpoint`` with both folders and the transformers model, built
once per test session; the ``ckpt_name`` fixture runs a test once per checkpoint of ``SPECS``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the repository folder on sys.path, where the top-level kernels/ folder
# would shadow PyPI's `kernels` package (transformers imports it); the project is importable
# through its installation (kernels/ as mamba_eval.kernels).
_REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]
sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...` from any test folder

from helpers import perturb  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter. The variable is read when a kernel is
# decorated (its module first imported), so it is set here, before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command runs one worker per core) each worker, and every
# process it starts, computes on one thread: two workers with a thread per core each would put two
# OpenMP threads on every core, and those wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Every lm-eval run in the suite (in this process and the subprocesses it starts) uses the task-index
# and template caches, which `mamba-eval` turns on for users: without them each run rebuilds lm-eval's
# task index from ~15,000 YAML files, about 10 CPU-seconds. The caches' exactness is tested against
# lm-eval's own build (test_harness_cache.py), and the tests of the opt-in itself set the variable.
os.environ.setdefault("MAMBA_EVAL_HARNESS_CACHE", "1")


@dataclass(frozen=True)
class Spec:
    arch: str  # "mamba1" | "mamba2"
    vocab_size: int  # the tokenizer's; stored rows are padded to a multiple of pad_multiple
    pad_multiple: int
    hf: dict = field(default_factory=dict)  # transformers config fields

    @property
    def stored_vocab(self) -> int:
        """Rows of the embedding and the LM head (the vocabulary padded as mamba_ssm pads it)."""
        return -(-self.vocab_size // self.pad_multiple) * self.pad_multiple


SPECS = {
    # Mamba-1 with mamba_ssm's defaults (d_conv 4, expand 2, dt_rank "auto"); tied.
    "mamba1-tiny": Spec("mamba1", 100, 8, dict(hidden_size=64, num_hidden_layers=2, state_size=8)),
    # Mamba-1 with every size set: odd conv width, explicit dt_rank, projection biases, untied.
    "mamba1-small": Spec("mamba1", 250, 8, dict(
        hidden_size=96, num_hidden_layers=3, state_size=16, conv_kernel=3, time_step_rank=7, use_bias=True,
        tie_word_embeddings=False)),
    # Mamba-2, one group, tied.
    "mamba2-tiny": Spec("mamba2", 100, 16, dict(
        hidden_size=64, num_hidden_layers=2, state_size=8, head_dim=16, num_heads=8, n_groups=1, chunk_size=16,
        tie_word_embeddings=True)),
    # Mamba-2, two groups of six heads, no conv bias, projection biases, untied.
    "mamba2-small": Spec("mamba2", 120, 16, dict(
        hidden_size=96, num_hidden_layers=3, state_size=12, head_dim=16, num_heads=12, n_groups=2, chunk_size=16,
        use_conv_bias=False, use_bias=True, tie_word_embeddings=False)),
}


@dataclass
class Checkpoint:
    name: str
    spec: Spec
    hf_dir: Path  # transformers format (config.json + model.safetensors)
    ssm_dir: Path  # mamba_ssm format (config.json + pytorch_model.bin)
    hf_model: torch.nn.Module  # the transformers model the folders were written from (fp32, eval)

    def dir(self, fmt: str) -> Path:
        return {"transformers": self.hf_dir, "mamba_ssm": self.ssm_dir}[fmt]


def _mamba_ssm_config(spec: Spec) -> dict:
    hf = spec.hf
    if spec.arch == "mamba1":
        ssm_cfg = {"d_state": hf["state_size"]}
        for ours, theirs in (("d_conv", "conv_kernel"), ("dt_rank", "time_step_rank"), ("bias", "use_bias")):
            if theirs in hf:
                ssm_cfg[ours] = hf[theirs]
    else:
        ssm_cfg = {
            "layer": "Mamba2", "d_state": hf["state_size"], "headdim": hf["head_dim"], "ngroups": hf["n_groups"],
            "chunk_size": hf["chunk_size"], "conv_bias": hf.get("use_conv_bias", True),
            "bias": hf.get("use_bias", False),
        }
    return {
        "d_model": hf["hidden_size"],
        "d_intermediate": 0,
        "n_layer": hf["num_hidden_layers"],
        "vocab_size": spec.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": spec.pad_multiple,
        "tie_embeddings": hf.get("tie_word_embeddings", spec.arch == "mamba1"),
    }


def write_mamba_ssm_checkpoint(hf_model: torch.nn.Module, spec: Spec, folder: Path) -> None:
    """Write ``hf_model`` in mamba_ssm's format (keys ``backbone.embedding.*``, lm_head always stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in hf_model.state_dict().items():
        state[key.replace("backbone.embeddings.", "backbone.embedding.")] = tensor.clone()
    state.setdefault("lm_head.weight", state["backbone.embedding.weight"].clone())
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(_mamba_ssm_config(spec), indent=2))


def build_checkpoint(name: str, root: Path) -> Checkpoint:
    import transformers

    spec = SPECS[name]
    cls_config, cls_model = {
        "mamba1": (transformers.MambaConfig, transformers.MambaForCausalLM),
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
    }[spec.arch]
    config = cls_config(vocab_size=spec.stored_vocab, layer_norm_epsilon=1e-5, **spec.hf)
    torch.manual_seed(1234)
    model = cls_model(config).eval()
    perturb(model, torch.Generator().manual_seed(5678))
    hf_dir, ssm_dir = root / name / "transformers", root / name / "mamba_ssm"
    model.save_pretrained(hf_dir)
    write_mamba_ssm_checkpoint(model, spec, ssm_dir)
    return Checkpoint(name, spec, hf_dir, ssm_dir, model)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(name)`` -> ``Checkpoint`` for a name of ``SPECS``, built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[str, Checkpoint] = {}

    def get(name: str) -> Checkpoint:
        if name not in cache:
            cache[name] = build_checkpoint(name, root)
        return cache[name]

    return get


@pytest.fixture(params=list(SPECS))
def ckpt_name(request) -> str:
    """Each checkpoint name of ``SPECS`` in turn."""
    return request.param


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: tests of many small forwards stay fast even when the
    machine's cores are busy with other work (two OpenMP threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir():
    """The real task data and tokenizer (``helpers_data``); skips when the folder is absent."""
    from helpers_data import require_data_dir

    return require_data_dir()


@pytest.fixture(scope="session")
def tok_dir(data_dir):
    """The GPT-NeoX-20B tokenizer of the Mamba releases."""
    return data_dir / "tokenizers" / "gpt-neox-20b"


@pytest.fixture(scope="session")
def chat_tok_dir(tok_dir, tmp_path_factory):
    """The GPT-NeoX-20B tokenizer with a chat template (``helpers_data.CHAT_TEMPLATE``)."""
    from helpers_data import write_chat_tokenizer

    return write_chat_tokenizer(tok_dir, tmp_path_factory.mktemp("chat-tokenizer") / "tokenizer")


@pytest.fixture(scope="session")
def neox_checkpoint(tmp_path_factory):
    """A tiny random Mamba-1 in transformers' format with the GPT-NeoX-20B vocabulary (50277
    tokens padded to 50280 rows), for runs with the real tokenizer, ``--model hf`` beside
    ``--model mamba``. Its embedding is spread and its LM head untied, so that what it generates
    varies with the prompt (a tied random model mostly repeats the prompt's last token)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=50280, hidden_size=32, num_hidden_layers=2, state_size=8,
                                      residual_in_fp32=True, tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.MambaForCausalLM(config)
    with torch.no_grad():
        model.backbone.embeddings.weight.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("neox-checkpoint") / "model"
    model.save_pretrained(folder)
    return folder
