"""The lm-eval model class ``mamba``: a thin adapter.

It parses ``--model_args`` (the same names as lm-eval's ``hf`` model where they mean the same
thing), loads the checkpoint through ``mamba_eval.models.checkpoint``, tokenises as lm-eval's HF models do,
and hands token-level work to ``mamba_eval.harness.engine`` (scoring) and ``mamba_eval.harness.generation``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from mamba_eval.errors import MambaEvalError, ModelArgsError, install_cli_excepthook
from mamba_eval.harness.generation import GenerateTimes, SamplingParams, generate, tail_stop_checker
from mamba_eval.harness.engine import DEFAULT_CONTEXT_CHUNK, gc_paused, score_continuations, score_documents

log = logging.getLogger(__name__)

# Bad model_args or checkpoints end `lm_eval` with one line, not a traceback.
install_cli_excepthook()

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
DEFAULT_MAX_LENGTH = 2048  # the published Mamba evaluations used lm-eval's mamba default
DEFAULT_MAX_GEN_TOKS = 256
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROLLING_MODES = ("windows", "stateful")

# model_args accepted by `hf` that do not apply here: accepted so that scripts written for `hf`
# keep working, with the reason they have no effect.
_ACCEPTED_NOOPS = {
    "trust_remote_code": "checkpoints are read as data; no code from them is ever executed",
    "use_fast_tokenizer": "the fast tokenizer is always used",
}


def _parse_batch_size(value) -> int | str:
    if value is None:
        return 1
    text = str(value)
    if text.startswith("auto"):
        if text not in ("auto",) and not text.startswith("auto:"):
            raise ModelArgsError(f"batch_size={value!r}: expected an integer or 'auto'")
        return "auto"  # `auto:N` re-detection is not needed: the budget holds for all lengths
    try:
        size = int(text)
    except ValueError:
        raise ModelArgsError(f"batch_size={value!r}: expected an integer or 'auto'") from None
    if size < 1:
        raise ModelArgsError(f"batch_size={value!r}: must be at least 1")
    return size


def _parse_device(value: str | None) -> torch.device:
    if value in (None, "", "auto"):
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ModelArgsError(f"device={value!r} is not a device torch knows") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", value)
        device = torch.device("cpu")
    return device


def _parse_positive(name: str, value) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"{name}={value!r}: expected a positive integer") from None
    if number < 1:
        raise ModelArgsError(f"{name}={value!r}: expected a positive integer")
    return number


def _parse_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgsError(f"{name}={value!r}: expected true or false")


class _ProgressBar:
    """A tqdm bar over requests with requests/s and tokens/s (tokens run through the model) in
    its postfix. The engine calls it as ``bar(requests_finished, tokens)``."""

    def __init__(self, total: int, desc: str, disable: bool):
        self.bar = tqdm(total=total, desc=desc, disable=disable)
        self.start = self.shown = time.perf_counter()
        self.requests = self.tokens = 0

    def __call__(self, requests: int, tokens: int) -> None:
        self.requests += requests
        self.tokens += tokens
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        postfix = {"req/s": f"{self.requests / elapsed:.1f}", "tok/s": f"{self.tokens / elapsed:.0f}"}
        if requests:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(requests)
        elif now - self.shown > 0.5:  # long documents: show the token rate between requests
            self.bar.set_postfix(postfix)
            self.shown = now

    def update(self, n: int = 1) -> None:
        self(n, 0)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


# decode_state_dtype model_arg values: torch dtype names, or "auto" for the model's dtype.
_STATE_DTYPES = ("float32", "bfloat16", "float16", "auto")


# Strings per thread below which one call of the Rust tokenizer is as fast as several.
_ENCODE_CHUNK = 2048


def _encode_in_threads(encode, texts: list[str]) -> list[list[int]]:
    """``[e.ids for e in encode(texts)]``, with contiguous slices of ``texts`` encoded in threads.

    lm-eval's command line sets ``TOKENIZERS_PARALLELISM=false``, so one ``encode_batch`` call
    runs on one core; the Rust tokenizer releases the GIL while it encodes, so threads over
    slices use the other cores (tokenising HellaSwag's 50k strings was 3.6 s of a 7.8 s
    loglikelihood phase on the 16-core H200 host). The result does not depend on the number of
    threads: each string is encoded on its own either way."""
    workers = min(os.cpu_count() or 1, 16, -(-len(texts) // _ENCODE_CHUNK))
    if workers <= 1:
        return [enc.ids for enc in encode(texts)]
    from concurrent.futures import ThreadPoolExecutor

    step = -(-len(texts) // workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="mamba-eval-tokenize") as pool:
        parts = list(pool.map(lambda lo: [enc.ids for enc in encode(texts[lo:lo + step])],
                              range(0, len(texts), step)))
    return [ids for part in parts for ids in part]


@dataclasses.dataclass
class GenerationStats:
    """What one ``generate_until`` call did: requests, prompt tokens, generated tokens (EOS and
    what follows a stop string excluded) and the wall time of the generation itself (prefill and
    decoding; tokenising and detokenising excluded), with its prefill and decoding parts
    (``mamba_eval.harness.generation.GenerateTimes``: the prefill includes picking each sequence's first
    token; setting up the decode buffers and graphs is in neither part)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def add(self, requests: int, prompt_tokens: int, generated_tokens: int, seconds: float,
            prefill_seconds: float = 0.0, decode_seconds: float = 0.0) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self.seconds += seconds
        self.prefill_seconds += prefill_seconds
        self.decode_seconds += decode_seconds

    @property
    def ms_per_generated_token(self) -> float | None:
        return 1e3 * self.seconds / self.generated_tokens if self.generated_tokens else None

    @property
    def decode_ms_per_generated_token(self) -> float | None:
        """Decoding time alone per generated token (the first token of each sequence comes out of
        the prefill, so prefill and decoding per token add up to about the overall figure)."""
        return 1e3 * self.decode_seconds / self.generated_tokens if self.generated_tokens else None

    def __str__(self) -> str:
        text = (f"{self.requests} requests, {self.prompt_tokens} prompt tokens, {self.generated_tokens} generated "
                f"tokens in {self.seconds:.2f} s (prefill {self.prefill_seconds:.2f} s, decoding "
                f"{self.decode_seconds:.2f} s)")
        if self.generated_tokens:
            text += (f": {self.ms_per_generated_token:.3f} ms per generated token overall, "
                     f"{self.decode_ms_per_generated_token:.3f} ms decoding alone")
        return text


class MambaLM(TemplateLM):
    """Mamba and Mamba-2 checkpoints (mamba_ssm or transformers format) for lm-eval.

    model_args: ``pretrained`` (folder or hub id), ``tokenizer`` (default: the checkpoint's own
    tokenizer files, else EleutherAI/gpt-neox-20b), ``revision``, ``dtype`` (auto, float32,
    bfloat16, float16), ``device``, ``batch_size`` (int or ``auto``), ``max_batch_size``,
    ``max_length`` (default 2048), ``backend`` (op implementations: ``ref``, ``triton``),
    ``add_bos_token``, ``prefix_token_id``, and four of our own:

    - ``share_context`` (default true): requests with the same context tokens run the context
      once and fork its recurrent state for each continuation (``mamba_eval.harness.engine``); false runs
      every request as one sequence, as lm-eval's HF models do. Both give the same scores up to
      floating-point rounding.
    - ``rolling`` (``windows`` or ``stateful``): how ``loglikelihood_rolling`` (perplexity tasks)
      scores a document. ``windows`` (default) uses lm-eval's disjoint windows of ``max_length``
      tokens, so published perplexities are reproduced; ``stateful`` conditions every token on
      the whole document before it, carrying the recurrent state from chunk to chunk of
      ``min(max_length, context_chunk)`` tokens (memory does not grow with the document).
    - ``batch_invariant`` (default true): keep a request's score independent of the batch it
      runs in, bit for bit. On the CPU every forward gets shapes that make the libraries'
      arithmetic the same for every row (filler rows: more work, the more threads); on CUDA the
      model runs the batch-invariant kernels and GEMMs (``mamba_eval.models.ops``), decoding steps
      included, so ``generate_until`` gives a prompt the same tokens at every batch size. False is
      faster (cuBLAS; Mamba-1 decoding at small batches through the fused step).
    - ``context_chunk`` (default 16384): a sequence longer than this many tokens (a long-context
      probe's context or prompt, with ``max_length`` raised to fit it) runs in chunks of it that
      carry the recurrent state, so memory stays flat in the sequence's length.
    - ``decode_state_dtype`` (``float32`` default, ``bfloat16``, ``float16``, or ``auto`` for the
      model's dtype): how ``generate_until`` stores the SSM states between decoding steps. The
      step's math is fp32 either way; a 16-bit state halves the bytes a step moves, which is what
      bounds large-batch decoding of Mamba-2 (mamba_ssm's cache keeps the model's dtype).

    ``batch_size=N`` sets a token budget of N times the longest request; ``auto`` takes a share
    of the free memory (capped at ``max_batch_size`` rows of the longest request when
    ``max_batch_size`` is given). With ``batch_invariant`` a request's score does not depend on
    the batch size or the request order, bit for bit (``mamba_eval.harness.engine``, point 5).
    """

    def __init__(
        self,
        pretrained: str = "state-spaces/mamba-130m",
        tokenizer: str | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | str | None = None,
        max_length: int | str | None = None,
        backend: str | None = None,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | str | None = None,
        share_context: bool | str = True,
        rolling: str = "windows",
        batch_invariant: bool | str = True,
        context_chunk: int | str | None = None,
        decode_state_dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        for key in list(kwargs):
            if key in _ACCEPTED_NOOPS:
                log.info("model_args %s has no effect: %s", key, _ACCEPTED_NOOPS[key])
                kwargs.pop(key)
        if kwargs:
            accepted = sorted(
                ["pretrained", "tokenizer", "revision", "dtype", "device", "batch_size",
                 "max_batch_size", "max_length", "backend", "add_bos_token", "prefix_token_id",
                 "share_context", "rolling", "batch_invariant", "context_chunk", "decode_state_dtype",
                 *_ACCEPTED_NOOPS]
            )
            raise ModelArgsError(
                f"unknown model_args key(s) for --model mamba: {', '.join(sorted(kwargs))} "
                f"(accepted: {', '.join(accepted)})"
            )
        if str(dtype) not in DTYPES:
            raise ModelArgsError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if str(rolling) not in ROLLING_MODES:
            raise ModelArgsError(f"rolling={rolling!r} is not one of {', '.join(ROLLING_MODES)}")
        self.rolling = str(rolling)
        self.share_context = _parse_bool("share_context", share_context)
        self.batch_invariant = _parse_bool("batch_invariant", batch_invariant)

        from mamba_eval.models import checkpoint  # heavy imports stay out of lm-eval's registry scan

        self._rank, self._world_size, self.accelerator = 0, 1, None
        device_obj = self._setup_distributed(_parse_device(device))
        self._device = device_obj
        self.batch_size_arg = _parse_batch_size(batch_size)
        # Scoring: a cap on `auto` only when given; generation: its batch size under `auto`.
        self._score_max_batch_size = _parse_positive("max_batch_size", max_batch_size)
        self.max_batch_size = self._score_max_batch_size or 64
        self._max_length = int(max_length) if max_length is not None else DEFAULT_MAX_LENGTH
        if self._max_length < 1:
            raise ModelArgsError(f"max_length={max_length!r}: must be at least 1")
        self.context_chunk = _parse_positive("context_chunk", context_chunk) or DEFAULT_CONTEXT_CHUNK
        if str(decode_state_dtype) not in _STATE_DTYPES:
            raise ModelArgsError(
                f"decode_state_dtype={decode_state_dtype!r} is not one of {', '.join(_STATE_DTYPES)}")
        self._decode_state_dtype = str(decode_state_dtype)
        self.generation_stats = GenerationStats()  # of the last generate_until call

        self.pretrained = str(pretrained)
        self.revision = revision
        path = loader.resolve_checkpoint(self.pretrained, revision=revision)
        from mamba_eval.models.ops import default_backend

        backend_name = backend or default_backend(device_obj)
        # Batch invariance on a GPU: the kernels' batch-invariant variants and a GEMM whose tiling
        # ignores the row count (mamba_eval.models.ops); on the CPU the engine's shapes do it.
        self.model = loader.load_model(
            path, dtype=str(dtype), device=device_obj, backend=backend_name,
            batch_invariant=self.batch_invariant and device_obj.type == "cuda",
        )
        self.model.eval()
        self.tokenizer = self._load_tokenizer(tokenizer, path, revision)
        self.add_bos_token = None if add_bos_token is None else _parse_bool("add_bos_token", add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        vocab_rows = self.model.config.vocab_size
        if len(self.tokenizer) > vocab_rows:
            raise ModelArgsError(
                f"tokenizer has {len(self.tokenizer)} tokens but the checkpoint's embedding has "
                f"only {vocab_rows} rows: wrong tokenizer for this model?"
            )

    # -- set-up -------------------------------------------------------------------------------
    def _setup_distributed(self, device: torch.device) -> torch.device:
        """One process per GPU under `accelerate launch`: lm-eval shards the requests by
        rank and gathers the results through the methods below."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return device
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            return accelerator.device
        return device

    @staticmethod
    def _load_tokenizer(name: str | None, checkpoint_dir, revision):
        from transformers import AutoTokenizer

        from mamba_eval.models.checkpoint import has_tokenizer_files

        if name is None:
            name = str(checkpoint_dir) if has_tokenizer_files(checkpoint_dir) else DEFAULT_TOKENIZER
            rev = revision if name == str(checkpoint_dir) else None
        else:
            rev = None
        try:
            tok = AutoTokenizer.from_pretrained(name, revision=rev, use_fast=True)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelArgsError(f"cannot load tokenizer {name!r}: {first}") from None
        return tok

    # -- properties lm-eval reads ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def decode_state_dtype(self) -> torch.dtype:
        """Storage dtype of the SSM states while generating (model_arg ``decode_state_dtype``)."""
        name = self._decode_state_dtype
        return self.model.dtype if name == "auto" else getattr(torch, name)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self):
        return self.batch_size_arg

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_revision": self.revision,
            "mamba_config": dataclasses.asdict(self.model.config),
        }

    # -- distributed primitives used by lm-eval's evaluator --------------------------------------
    def all_gather(self, tensor):
        return self.accelerator.gather(tensor) if self.accelerator else tensor

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        import torch.distributed as dist

        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # -- tokenisation ---------------------------------------------------------------------------
    def _special_tokens_kwargs(self, add_special_tokens: bool | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if self.add_bos_token is not None:
            return {"add_special_tokens": self.add_bos_token}
        return {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, **self._special_tokens_kwargs(add_special_tokens))

    def tok_encode_many(self, strings: list[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """``tok_encode`` of each string, in one call of the fast tokenizer (each distinct string once)."""
        unique = list(dict.fromkeys(strings))
        if not unique:
            return []
        kwargs = self._special_tokens_kwargs(add_special_tokens)
        backend = self._backend_encoder(kwargs)
        if backend is not None:
            ids = _encode_in_threads(backend, unique)
        else:
            ids = self.tokenizer(unique, return_attention_mask=False, **kwargs)["input_ids"]
        table = dict(zip(unique, ids))
        return [table[s] for s in strings]

    def _backend_encoder(self, kwargs: dict):
        """The Rust tokenizer's ``encode_batch`` behind a fast tokenizer (``encode_batch_fast``
        where it exists: no character offsets), when it gives exactly the ids of
        ``self.tokenizer(...)`` (checked once per setting on probe strings): it skips
        transformers' per-string conversion, a large share of tokenising 40k requests. ``None``
        for other tokenizers, and for a backend that truncates or pads by itself."""
        key = kwargs.get("add_special_tokens", True)
        cache = self.__dict__.setdefault("_backend_encoders", {})
        if key not in cache:
            cache[key] = None
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if (backend is not None and hasattr(backend, "encode_batch")
                    and getattr(backend, "truncation", None) is None and getattr(backend, "padding", None) is None):
                probes = ["Hello world", " leading space", "A: b.\n\nTwo  spaces", "ünïcödé 字 🙂", "x"]
                encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
                try:
                    fast = [e.ids for e in encode(probes, add_special_tokens=key)]
                    slow = self.tokenizer(probes, return_attention_mask=False, **kwargs)["input_ids"]
                except Exception:  # any failure: keep the tokenizer's own path
                    fast, slow = None, True
                if fast == [list(x) for x in slow]:
                    cache[key] = lambda texts: encode(texts, add_special_tokens=key)
        return cache[key]

    def _splits_before_space(self) -> bool:
        """Whether ``tok_encode(a + b) == tok_encode(a) + tok_encode(b, add_special_tokens=False)``
        holds for every ``a`` that ends in a non-whitespace character and every ``b`` that starts
        with a space (checked once, from the tokenizer's own description, see below).

        It holds for a byte-level BPE tokenizer (GPT-2's pre-tokenizer regex, the GPT-NeoX-20B
        tokenizer of the Mamba releases) whose pieces of text cannot cross such a boundary:

        - added tokens (matched first, on the raw or normalised text) contain no non-whitespace
          character followed by a space, so none can straddle the boundary, and none absorbs the
          space after it (``rstrip``) or depends on its neighbours (``single_word``);
        - the normaliser is none or NFC, and no canonical composition involves a following space;
        - in the pre-tokenizer's pattern ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
          ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`` no alternative matches a non-whitespace character
          followed by whitespace, and the one look-ahead sees whitespace either way; there is no
          look-behind. So the pieces of ``a + b`` are those of ``a`` followed by those of ``b``,
          and BPE merges within pieces;
        - the post-processor adds no tokens after the text (special tokens before it, with
          ``add_special_tokens``, are part of ``tok_encode(a)``), and the backend neither
          truncates nor pads.

        (lm-eval's contexts never end in whitespace: it moves trailing whitespace to the
        continuation, and most continuations start with a space.) Any other tokenizer: ``False``.
        """
        cached = self.__dict__.get("_splits_before_space_cache")
        if cached is None:
            cached = self.__dict__["_splits_before_space_cache"] = self._check_splits_before_space()
        return cached

    def _check_splits_before_space(self) -> bool:
        import json

        encoders = [self._backend_encoder(self._special_tokens_kwargs(None)),
                    self._backend_encoder({"add_special_tokens": False})]
        if None in encoders:
            return False
        try:
            spec = json.loads(self.tokenizer.backend_tokenizer.to_str())
        except Exception:  # no serialisable description: do not assume anything
            return False
        if spec.get("truncation") is not None or spec.get("padding") is not None:
            return False
        for token in spec.get("added_tokens") or []:
            text = token.get("content", "")
            if token.get("rstrip") or token.get("single_word"):
                return False
            if any(text[i] == " " and not text[i - 1].isspace() for i in range(1, len(text))):
                return False
        normalizer = spec.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            return False
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            return False
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return False

        def adds_nothing_after(proc) -> bool:
            if proc is None or proc.get("type") == "ByteLevel":
                return True
            if proc.get("type") == "Sequence":
                return all(adds_nothing_after(p) for p in proc.get("processors", []))
            if proc.get("type") == "TemplateProcessing":
                single = proc.get("single") or []
                return bool(single) and "Sequence" in single[-1] and all("SpecialToken" in x for x in single[:-1])
            return False

        if not adds_nothing_after(spec.get("post_processor")):
            return False
        # The library's behaviour, on a few boundaries (a guard against a changed implementation).
        probes = [("Hello", " world"), ("x.", "  two spaces"), ("caf\u00e9", " \u0301 accent"), ("a1", " 2b"),
                  ("it'", " s"), ("<|endoftext|>", " after"), ("tab\tend", " \t x"), ("\u5b57", " \U0001f642")]
        wholes = self.tok_encode_many([a + b for a, b in probes])
        firsts = self.tok_encode_many([a for a, _ in probes])
        seconds = self.tok_encode_many([b for _, b in probes], add_special_tokens=False)
        return all(w == f + s for w, f, s in zip(wholes, firsts, seconds))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) of each (context, continuation) string pair,
        exactly as lm-eval's ``TemplateLM.loglikelihood`` makes them, but with two or three
        tokenizer calls for all pairs instead of two per pair.

        The context's trailing whitespace moves to the continuation; the whole string and the
        context are tokenised and the continuation is the whole's tokens past the context's. An
        empty context becomes the prefix token (or the continuation's first token when that is
        the prefix token), with the continuation tokenised without special tokens.

        With a tokenizer that splits before a space (:meth:`_splits_before_space`, true of the
        GPT-NeoX-20B tokenizer), a continuation that starts with a space is tokenised on its own
        instead of inside the whole string: the same tokens, for a fraction of the text (a
        HellaSwag context is tokenised once instead of once per ending).
        """
        split = self._splits_before_space()
        contexts, wholes, tails, bare = [], [], [], []
        kinds = []  # per pair: 0 empty context, 1 whole string, 2 context and continuation apart
        for context, continuation in pairs:
            if context == "":
                bare.append(continuation)
                kinds.append(0)
                continue
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces > 0:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            contexts.append(context)
            if split and context and continuation[:1] == " ":
                tails.append(continuation)
                kinds.append(2)
            else:
                wholes.append(context + continuation)
                kinds.append(1)
        encoded = self.tok_encode_many(contexts + wholes)
        ctx_ids, whole_ids = encoded[:len(contexts)], iter(encoded[len(contexts):])
        tail_ids = iter(self.tok_encode_many(tails, add_special_tokens=False))
        bare_ids = iter(self.tok_encode_many(bare, add_special_tokens=False))
        out: list[tuple[list[int], list[int]]] = []
        at = 0
        for i, kind in enumerate(kinds):
            if kind == 0:
                cont = next(bare_ids)
                if not cont:
                    raise MambaEvalError(f"request {i}: empty context and empty continuation")
                prefix = self.prefix_token_id
                out.append(([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:]))
            else:
                ctx = ctx_ids[at]
                out.append((ctx, next(tail_ids) if kind == 2 else next(whole_ids)[len(ctx):]))
                at += 1
        return out

    # -- requests ---------------------------------------------------------------------------------
    def _progress(self, total: int, desc: str, disable: bool) -> _ProgressBar:
        return _ProgressBar(total, desc, disable or self._rank != 0)

    def _engine_args(self) -> dict:
        return dict(
            batch_size=self.batch_size_arg, max_batch_size=self._score_max_batch_size,
            device=self._device, pad_id=self.eot_token_id, batch_invariant=self.batch_invariant,
        )

    def _score_args(self) -> dict:
        return dict(self._engine_args(), context_chunk=self.context_chunk)

    @gc_paused()  # many small lists, no cycles: see engine.gc_paused
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        encoded = self.encode_pairs(pairs)
        return self._loglikelihood_tokens(
            [(pair, ctx, cont) for pair, (ctx, cont) in zip(pairs, encoded)], disable_tqdm=disable_tqdm
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with self._progress(len(pairs), "Running loglikelihood requests", disable_tqdm) as bar:
            results = score_continuations(
                self.model, pairs, max_length=self.max_length, share_context=self.share_context,
                on_progress=bar, **self._score_args(),
            )
        for (request_str, _, _), res in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, res)
        return results

    @gc_paused()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        documents = self.tok_encode_many([req.args[0] for req in requests])
        if self.rolling == "stateful":
            with self._progress(len(documents), "Running loglikelihood_rolling documents", disable_tqdm) as bar:
                totals = score_documents(
                    self.model, documents, prefix_token=self.prefix_token_id,
                    chunk_length=min(self.max_length, self.context_chunk),
                    on_progress=bar, **self._engine_args(),
                )
        else:
            # lm-eval's own disjoint windows of max_length tokens, so published perplexities hold.
            windows, owners = [], []
            for idx, tokens in enumerate(documents):
                for ctx, cont in map(
                    lm_utils.make_disjoint_window,
                    lm_utils.get_rolling_token_windows(
                        token_list=tokens, prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1,
                    ),
                ):
                    windows.append((ctx, cont))
                    owners.append(idx)
            with self._progress(len(windows), "Running loglikelihood_rolling windows", disable_tqdm) as bar:
                scores = score_continuations(
                    self.model, windows, max_length=self.max_length, share_context=self.share_context,
                    on_progress=bar, **self._score_args(),
                )
            totals = [0.0] * len(requests)
            for idx, (logprob, _) in zip(owners, scores):
                totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        results: list[str | None] = [None] * len(requests)
        batch = self.batch_size_arg if isinstance(self.batch_size_arg, int) else self.max_batch_size
        stats = GenerationStats()
        with self._progress(len(requests), "Running generate_until requests", disable_tqdm) as bar:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[1]
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                params = SamplingParams(
                    do_sample=bool(kwargs.pop("do_sample", False)),
                    temperature=float(kwargs.pop("temperature", 0.0) or 0.0),
                    top_k=int(kwargs.pop("top_k", 0) or 0),
                    top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                    seed=kwargs.pop("seed", None),  # None: the global RNG, seeded by --seed
                )
                if kwargs:
                    log.warning("generation kwargs ignored by --model mamba: %s", sorted(kwargs))
                max_ctx = self.max_length - max_gen
                if max_ctx < 1:
                    raise ModelArgsError(
                        f"max_gen_toks={max_gen} leaves no room for the prompt within max_length="
                        f"{self.max_length}"
                    )
                prompts = [self.tok_encode(requests[i].args[0])[-max_ctx:] for i in indices]
                stops = [s for s in until if s]
                # Each step decodes only a tail of the generated tokens (same answer as the whole).
                stopped = tail_stop_checker(
                    lambda toks: self.tok_decode(toks, skip_special_tokens=False), stops
                ) if stops else None

                start = time.perf_counter()
                times = GenerateTimes()
                outs = generate(
                    self.model, prompts, max_new_tokens=max_gen, params=params,
                    eos_id=self.eot_token_id, is_stopped=stopped,
                    batch_size=batch, device=self._device, prefill_chunk=self.context_chunk,
                    state_dtype=self.decode_state_dtype, times=times,
                )
                stats.add(len(prompts), sum(map(len, prompts)), sum(map(len, outs)), time.perf_counter() - start,
                          times.prefill_s, times.decode_s)
                for i, toks in zip(indices, outs):
                    text = postprocess_generated_text(self.tok_decode(toks), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        self.generation_stats = stats
        if stats.requests:
            log.info("generate_until: %s", stats)
        return results  # type: ignore[return-value]
