"""The lm-eval model class ``mamba``: a thin adapter.

It keeps lm-eval's contract only: the ``TemplateLM`` methods and the properties lm-eval reads, the
distributed primitives of its evaluator, and the hand-over of token-level work to
``mamba_eval.harness.engine`` (scoring) and ``mamba_eval.harness.generation``. ``--model_args``
are the parameters of :class:`MambaLM` (the same names as lm-eval's ``hf`` model where they mean
the same thing), checked and parsed by ``mamba_eval.harness.model_args``; tokenisation is
``mamba_eval.harness.tokenization``; the checkpoint loads through ``mamba_eval.models.checkpoint``.
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
from lm_eval.models.utils import postprocess_generated_text
from tqdm import tqdm

from mamba_eval.errors import MambaEvalError, ModelArgsError, install_cli_excepthook
from mamba_eval.harness.generation import GenerateTimes, generate, parse_gen_kwargs, tail_stop_checker
from mamba_eval.harness.engine import DEFAULT_CONTEXT_CHUNK, gc_paused, score_continuations, score_documents
from mamba_eval.harness.model_args import (
    check_extra_keys,
    merge_run_flags,
    parse_batch_size,
    parse_bool,
    parse_choice,
    parse_device,
    parse_int,
    parse_positive,
)
from mamba_eval.harness.tokenization import BatchTokenizer, load_tokenizer
from mamba_eval.models.dtypes import AUTO, parse_dtype

log = logging.getLogger(__name__)

# Bad model_args or checkpoints end `lm_eval` with one line, not a traceback.
install_cli_excepthook()

DEFAULT_MAX_LENGTH = 2048  # the published Mamba evaluations used lm-eval's mamba default
DEFAULT_MAX_GEN_TOKS = 256
ROLLING_MODES = ("windows", "stateful")


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

    The parameters are the model_args (``mamba_eval.harness.model_args`` reads the accepted keys
    from this signature; README's table describes them for users). Those ``hf`` has mean what
    they mean there: ``pretrained`` (folder or hub id), ``tokenizer`` (default: the checkpoint's
    own tokenizer files, else ``tokenization.DEFAULT_TOKENIZER``), ``revision``, ``dtype``
    (``mamba_eval.models.dtypes``), ``device``, ``batch_size``, ``max_batch_size``,
    ``max_length`` (default 2048), ``add_bos_token``, ``prefix_token_id``. Ours:

    - ``backend``: the op implementations, ``ref`` or ``triton`` (default: ``triton`` on CUDA, which
      it needs).
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
      runs in, bit for bit, and a prompt's generated tokens independent of the batch size. What
      that takes on each device is the model's policy, ``mamba_eval.models.invariance``; false
      is faster.
    - ``context_chunk`` (default 16384): a sequence longer than this many tokens (a long-context
      probe's context or prompt, with ``max_length`` raised to fit it) runs in chunks of it that
      carry the recurrent state, so memory stays flat in the sequence's length.
    - ``decode_state_dtype`` (``float32`` default, any ``dtype`` value, ``auto`` for the
      model's dtype): how ``generate_until`` stores the SSM states between decoding steps. The
      step's math is fp32 either way; a 16-bit state halves the bytes a step moves, which is what
      bounds large-batch decoding of Mamba-2 (mamba_ssm's cache keeps the model's dtype).

    ``batch_size=N`` sets a token budget of N times the longest request; ``auto`` takes a share
    of the free memory (capped at ``max_batch_size`` rows of the longest request when
    ``max_batch_size`` is given). With ``batch_invariant`` a request's score does not depend on
    the batch size or the request order, bit for bit (``mamba_eval.harness.engine``, point 5).
    ``batch_size``, ``max_batch_size`` and ``device`` may come both in ``--model_args`` and from
    lm-eval's flags: the model_args value is used (``model_args.merge_run_flags``).
    """

    def __init__(
        self,
        pretrained: str = "state-spaces/mamba-130m",
        tokenizer: str | None = None,
        revision: str | None = None,
        dtype: str | torch.dtype = "auto",
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
        decode_state_dtype: str | torch.dtype = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        check_extra_keys(MambaLM, kwargs)
        model_dtype = parse_dtype(dtype, "dtype")
        self.rolling = parse_choice("rolling", rolling, ROLLING_MODES)
        self.share_context = parse_bool("share_context", share_context)
        self.batch_invariant = parse_bool("batch_invariant", batch_invariant)

        # heavy imports stay out of lm-eval's registry scan
        from mamba_eval.models import checkpoint as loader
        from mamba_eval.models.ops import default_backend

        self._rank, self._world_size, self.accelerator = 0, 1, None
        device_obj = self._setup_distributed(parse_device(device))
        self._device = device_obj
        self.batch_size_arg = parse_batch_size(batch_size)
        # Scoring: a cap on `auto` only when given; generation: its batch size under `auto`.
        self._score_max_batch_size = parse_positive("max_batch_size", max_batch_size)
        self.max_batch_size = self._score_max_batch_size or 64
        self._max_length = parse_positive("max_length", max_length) or DEFAULT_MAX_LENGTH
        self.context_chunk = parse_positive("context_chunk", context_chunk) or DEFAULT_CONTEXT_CHUNK
        self._decode_state_dtype = parse_dtype(decode_state_dtype, "decode_state_dtype")
        self.add_bos_token = None if add_bos_token is None else parse_bool("add_bos_token", add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else parse_int("prefix_token_id", prefix_token_id)
        self.generation_stats = GenerationStats()  # of the last generate_until call

        self.pretrained = str(pretrained)
        self.revision = revision
        path = loader.resolve_checkpoint(self.pretrained, revision=revision)
        backend_name = backend or default_backend(device_obj)
        # The model carries the batch-invariance policy the engine and generation follow.
        self.model = loader.load_model(
            path, dtype=model_dtype, device=device_obj, backend=backend_name, batch_invariant=self.batch_invariant,
        )
        self.model.eval()
        self.tokenizer = load_tokenizer(tokenizer, path, revision)
        vocab_rows = self.model.config.vocab_size
        if len(self.tokenizer) > vocab_rows:
            raise ModelArgsError(
                f"tokenizer has {len(self.tokenizer)} tokens but the checkpoint's embedding has "
                f"only {vocab_rows} rows: wrong tokenizer for this model?"
            )
        prefix = self.custom_prefix_token_id
        if prefix is not None and not 0 <= prefix < vocab_rows:
            raise ModelArgsError(f"prefix_token_id={prefix}: not a token id of this model (0 to {vocab_rows - 1})")
        prefix = self.prefix_token_id
        self.tok = BatchTokenizer(self.tokenizer, add_special_tokens=self.add_bos_token,
                                  bos_text=None if prefix is None else self.tokenizer.decode([prefix]))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MambaLM:
        """lm-eval's constructor from ``--model_args`` text, with its run-wide flags merged
        (``model_args.merge_run_flags``) instead of passed twice."""
        return cls(**merge_run_flags(lm_utils.simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> MambaLM:
        """lm-eval's constructor from a model_args dict (its command line parses ``--model_args``
        into one), with its run-wide flags merged as in :meth:`create_from_arg_string`."""
        return cls(**merge_run_flags(arg_dict, additional_config))

    # -- set-up -------------------------------------------------------------------------------
    def _setup_distributed(self, device: torch.device) -> torch.device:
        """One process per GPU under `accelerate launch`: lm-eval shards the requests by
        rank and gathers the results through the methods below."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return device
        from accelerate import Accelerator

        # accelerate takes a launch without CUDA for one process unless told it runs on CPUs.
        accelerator = Accelerator(cpu=device.type == "cpu")
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            return accelerator.device
        return device

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
        dtype = self._decode_state_dtype
        return self.model.dtype if dtype == AUTO else dtype

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

    # -- tokenisation (mamba_eval.harness.tokenization) ------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens)

    def tok_encode_many(self, strings: list[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """``tok_encode`` of each string, in one call of the fast tokenizer."""
        return self.tok.encode_many(strings, add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's (context tokens, continuation tokens) of each (context, continuation) pair,
        for all pairs at once (``BatchTokenizer.encode_pairs``)."""
        return self.tok.encode_pairs(pairs, self.prefix_token_id)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A chat rendered by the tokenizer's chat template, as ``hf`` renders it
        (``BatchTokenizer.apply_chat_template``); lm-eval calls it under ``--apply_chat_template``."""
        return self.tok.apply_chat_template(chat_history, add_generation_prompt)

    # -- requests ---------------------------------------------------------------------------------
    def _progress(self, total: int, desc: str, disable: bool) -> _ProgressBar:
        return _ProgressBar(total, desc, disable or self._rank != 0)

    def _engine_args(self) -> dict:
        return dict(
            batch_size=self.batch_size_arg, max_batch_size=self._score_max_batch_size,
            device=self._device, pad_id=self.eot_token_id,
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
        """lm-eval's ``generate_until``: each request's prompt, left-truncated as ``hf`` does to
        leave ``max_gen_toks`` tokens within ``max_length``, continued until a stop string, EOS
        or ``max_gen_toks`` tokens; its gen_kwargs checked by ``generation.parse_gen_kwargs``."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = req.args[1]
            groups.setdefault(repr(sorted(kwargs.items(), key=str) if isinstance(kwargs, dict) else kwargs),
                              []).append(i)
        results: list[str | None] = [None] * len(requests)
        batch = self.batch_size_arg if isinstance(self.batch_size_arg, int) else self.max_batch_size
        stats = GenerationStats()
        with self._progress(len(requests), "Running generate_until requests", disable_tqdm) as bar:
            for indices in groups.values():
                first = requests[indices[0]]
                task = getattr(first, "task_name", None)
                settings = parse_gen_kwargs(first.args[1], default_max_gen_toks=self.max_gen_toks, eos=eos_text,
                                            where=f"task {task}" if task else "")
                until, max_gen = settings.until, settings.max_gen_toks
                where = f"task {task}: " if task else ""
                max_ctx = self.max_length - max_gen
                if max_ctx < 1:
                    raise ModelArgsError(f"{where}max_gen_toks={max_gen} leaves no room for the prompt within "
                                         f"max_length={self.max_length}")
                prompts = [self.tok_encode(requests[i].args[0]) for i in indices]
                if not all(prompts):
                    raise MambaEvalError(f"{where}a prompt of no tokens: generation needs at least one token "
                                         "to start from")
                cut = sum(len(p) > max_ctx for p in prompts)
                if cut:
                    log.warning("generate_until: %d prompt(s) longer than max_length %d - max_gen_toks %d were cut "
                                "to their last %d tokens, as lm-eval's hf model does",
                                cut, self.max_length, max_gen, max_ctx)
                    prompts = [p[-max_ctx:] for p in prompts]
                stops = [s for s in until if s]
                # Each step decodes only a tail of the generated tokens (same answer as the whole).
                stopped = tail_stop_checker(
                    lambda toks: self.tok_decode(toks, skip_special_tokens=False), stops
                ) if stops else None

                start = time.perf_counter()
                times = GenerateTimes()
                outs = generate(
                    self.model, prompts, max_new_tokens=max_gen, params=settings.params,
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
