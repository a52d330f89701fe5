"""Cached autoregressive generation for ``generate_until``.

The recurrent state is the whole cache: a group of prompts is run once through
``backbone_forward`` (the *prefill*), which returns each layer's conv window and SSM state, then
``model.step`` advances one token at a time, updating those states in place. Each sequence stops
on EOS, on any stop string, or at ``max_new_tokens``; finished sequences leave the batch.

Prompts are prefilled in groups of up to ``batch_size``, longest first, and each group is then
decoded together. In models without attention layers, prompts of different lengths share one
prefill, padded on the right to the longest (``backbone_forward(lengths=...)``): each row's
returned state is its state after its own last token, the same bits as in a prefill of its own
length (Δ is ``-inf`` at padded positions, so the scan carries the state through them
unchanged; the conv window is gathered before the row's end), and its first generated token
comes from the hidden state at its own last position. A group is cut before its padding grows
past :data:`MAX_PADDING_RATIO` times its real tokens (:func:`prefill_groups`). Prompts that may
not share such a pass (``mamba_eval.models.rows.can_share_padded_pass``: every prompt of a
hybrid model, prompts longer than ``prefill_chunk`` or very short) keep prefills of one exact
length. Every prefill runs through the model's ``run_rows``, as the scoring engine's forwards do.

Under the model's batch-invariance policy (``mamba_eval.models.invariance``; ``--model mamba``'s
default) neither the prefill nor a decoding step depends on the other rows, so a prompt's tokens
are the same at every batch size: on CUDA through the invariant kernels, on the CPU through
filler rows in prefills and steps (:meth:`Invariance.step_rows`). Otherwise a batch's matrix
products may round their last bits differently from a batch of one, so a greedy token can depend
on the batch at a near-tie of two candidates.

Decoding runs through a :class:`DecodeRunner`, which owns a fixed set of state tensors for the
largest batch, the step's input ids and (with CUDA graphs) its output logits. Live sequences are
kept compacted at the front of those buffers: when some finish, the live rows are copied to the
front in place and the next step runs on the leading rows only (a narrowed view, contiguous, at
the same addresses). So finished sequences stop costing work, no state is reallocated, and every
tensor a step touches has a fixed address, which is what a CUDA graph needs: one graph is captured
per batch size in a small ladder (1, 2, 4, ... up to the largest batch) and ``n`` live rows replay
the smallest graph of at least ``n`` rows (the extra rows hold finished sequences' stale but finite
states; their outputs are ignored). A fixed batch with a mask would keep one graph but pay for
finished rows until the whole group ends.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from mamba_eval.errors import MambaEvalError
from mamba_eval.harness.model_args import as_integer
from mamba_eval.models.rows import can_share_padded_pass, padded_shape

#: A prefill group of prompts of different lengths is cut before its padded area (rows x the
#: longest prompt) exceeds this many times its real prompt tokens: padding then costs at most a
#: fifth of the prefill's work. Prompts of nearly equal lengths (a probe's documents of the same
#: target length) still share one pass; a long prompt does not pull short ones up to its length.
MAX_PADDING_RATIO = 1.25


@dataclass
class GenerateTimes:
    """Where ``generate`` spent its time; the fields are added to, so one object can sum several
    calls.

    ``prefill_s``: the prompt forwards, loading their states into the decoding buffers and
    picking each sequence's first token (the prefill's logits give it). ``decode_s``: the
    decoding steps after that, with the host's stop checks. Building or capturing the decode
    runner (once per model and batch size) is in neither. On CUDA the prefill ends with one
    synchronisation, so that its kernels are not counted as decoding; decoding is timed up to
    its last read of the tokens, which waits for the device.

    ``prefill_tokens``: real prompt tokens; ``padded_prefill_tokens``: rows x length of every
    prefill forward (padding included); ``prefill_forwards``: ``backbone_forward`` calls (a
    chunked prompt counts one per chunk); ``decode_steps``: batch steps of decoding run (a block
    of greedy steps counts each of its steps).
    """

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    padded_prefill_tokens: int = 0
    prefill_forwards: int = 0
    decode_steps: int = 0


@dataclass(frozen=True)
class SamplingParams:
    """lm-eval's ``gen_kwargs`` that change which token is picked. ``temperature == 0`` or
    ``do_sample=False`` is greedy decoding."""

    do_sample: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0.0


#: lm-eval's names for the number of tokens to generate, by priority (``normalize_gen_kwargs``).
MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
#: The generation kwargs ``--model mamba`` carries out. ``hf`` hands any other one to
#: transformers' ``generate``; this decoder has no such options, so another key is an error
#: rather than silently ignored.
GEN_KWARGS = ("until", *MAX_TOKENS_KEYS, "do_sample", "temperature", "top_k", "top_p", "seed", "num_beams")
_UNSUPPORTED_HINTS = {"max_length": "give the tokens to generate as max_gen_toks"}


@dataclass(frozen=True)
class GenerationSettings:
    """A ``generate_until`` request's ``gen_kwargs``, checked: the stop strings (the EOS text
    among them, as lm-eval adds it), the most tokens to generate, and how tokens are picked."""

    until: list[str]
    max_gen_toks: int
    params: SamplingParams


def parse_gen_kwargs(gen_kwargs, *, default_max_gen_toks: int, eos: str | None, where: str = "") -> GenerationSettings:
    """Check lm-eval's ``gen_kwargs`` of a ``generate_until`` request and read them as lm-eval's
    own ``normalize_gen_kwargs`` and ``handle_stop_sequences`` do (``max_gen_toks`` also under
    its aliases, ``do_sample`` and ``temperature`` made consistent, ``default_max_gen_toks``
    when no count is given). A key given as None counts as not given.

    Anything the decoder cannot carry out raises ``MambaEvalError`` in one line that names the
    key (``where`` first, e.g. the task): a key outside :data:`GEN_KWARGS`, ``num_beams`` other
    than 1, a token count that is not a positive integer, ``until`` not a string or a list of
    strings, ``do_sample`` not a bool, ``temperature`` not a number >= 0, ``top_p`` not in
    [0, 1], ``top_k`` not an integer >= 0, ``seed`` not an integer.
    """
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    prefix = f"{where}: " if where else ""
    if not isinstance(gen_kwargs, dict):
        raise MambaEvalError(f"{prefix}generation kwargs {gen_kwargs!r}: expected a mapping")
    given = {key: value for key, value in gen_kwargs.items() if value is not None}
    unknown = sorted(set(given) - set(GEN_KWARGS), key=str)
    if unknown:
        hints = "".join(f"; {key}: {_UNSUPPORTED_HINTS[key]}" for key in unknown if key in _UNSUPPORTED_HINTS)
        raise MambaEvalError(f"{prefix}generation kwargs not supported by --model mamba: "
                             f"{', '.join(map(str, unknown))} (supported: {', '.join(GEN_KWARGS)}){hints}")

    def bad(key: str, expected: str) -> MambaEvalError:
        return MambaEvalError(f"{prefix}generation kwarg {key}={given[key]!r}: {expected}")

    def number(key: str, low: float, high: float = float("inf")) -> bool:
        value = given.get(key)
        return (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and low <= value <= high))

    if as_integer(given.get("num_beams", 1)) != 1:
        raise bad("num_beams", "beam search is not implemented (num_beams=1 only)")
    given.pop("num_beams", None)  # one beam: what the decoder does
    until = given.get("until")
    if until is not None and not isinstance(until, str) and not (
            isinstance(until, list) and all(isinstance(stop, str) for stop in until)):
        raise bad("until", "expected a string or a list of strings")
    for key in MAX_TOKENS_KEYS:
        if key in given and (as_integer(given[key]) or 0) < 1:
            raise bad(key, "expected a positive integer")
    if not isinstance(given.get("do_sample", False), bool):
        raise bad("do_sample", "expected true or false")
    if not number("temperature", 0.0):
        raise bad("temperature", "expected a number >= 0")
    if not number("top_p", 0.0, 1.0):
        raise bad("top_p", "expected a number from 0 to 1")
    if "top_k" in given and (as_integer(given["top_k"]) is None or as_integer(given["top_k"]) < 0):
        raise bad("top_k", "expected an integer >= 0 (0: no top-k cut)")
    if "seed" in given and as_integer(given["seed"]) is None:
        raise bad("seed", "expected an integer")

    kwargs = normalize_gen_kwargs(given, default_max_gen_toks)
    seed = kwargs.get("seed")
    params = SamplingParams(
        do_sample=kwargs["do_sample"],
        temperature=float(kwargs.get("temperature", 0.0)),
        top_k=as_integer(kwargs.get("top_k", 0)),
        top_p=float(kwargs.get("top_p", 1.0)),
        seed=None if seed is None else as_integer(seed),  # None: the global RNG, seeded by --seed
    )
    until = handle_stop_sequences(kwargs["until"], eos=eos)
    return GenerationSettings(until=until, max_gen_toks=kwargs["max_gen_toks"], params=params)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Pick one token per row of ``logits`` [B, V] (fp32)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    # Shifted so that the largest is 0: a tiny temperature then gives -inf, never inf - inf.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first is always
        # kept (top_p=0 keeps only it, as in transformers).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    done: bool = False


class DecodeRunner:
    """Decoding steps over preallocated buffers for up to ``max_batch`` sequences.

    ``load(state)`` copies a prefill state into the leading rows; ``compact(keep)`` moves the
    listed live rows to the front (in place); ``run(tokens)`` advances the ``len(tokens)`` leading
    rows by one token and returns their fp32 logits ``[n, V]``. ``run_greedy(tokens)`` advances
    them by ``greedy_steps`` tokens at once, each step fed the argmax of the one before, and
    returns the chosen tokens ``[n, greedy_steps]`` (the last one's state not yet advanced by it),
    so the host looks at the tokens once per ``greedy_steps``.

    With ``cuda_graphs`` (CUDA only), ``capture()`` records one graph per size of the ladder (one
    step with logits out, or ``greedy_steps`` steps with the argmax inside); ``run`` and
    ``run_greedy`` then replay them. Without it the same buffers are used eagerly. A runner is
    reused across ``generate`` calls (:func:`decode_runner`): capture is paid once per model,
    batch size and mode.
    """

    def __init__(self, model, max_batch: int, *, cuda_graphs: bool = False, greedy_steps: int = 0,
                 max_length: int | None = None, state_dtype: torch.dtype = torch.float32):
        if max_batch < 1:
            raise ValueError(f"DecodeRunner: max_batch must be >= 1, got {max_batch}")
        if greedy_steps < 0:
            raise ValueError(f"DecodeRunner: greedy_steps must be >= 0, got {greedy_steps}")
        device = torch.device(model.device)
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"DecodeRunner: cuda_graphs needs a CUDA model, the model is on {device}")
        self.model = model
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.greedy_steps = greedy_steps
        # Attention layers keep key/value caches of max_length positions (prompt and generated
        # tokens); recurrent layers ignore it.
        self.max_length = max_length
        self.state_dtype = state_dtype
        # Rows of the buffers: a step of n sequences runs on invariance.step_rows(n) rows (filler
        # rows on the CPU under a batch-invariance policy).
        rows = model.invariance.step_rows(max_batch)
        self.state = model.allocate_state(rows, max_length=max_length, state_dtype=state_dtype)
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.chosen = torch.zeros(rows, max(greedy_steps, 1), dtype=torch.long, device=device)
        sizes, m = [], 1
        while m < max_batch:
            sizes.append(m)
            m *= 2
        self.sizes = sizes + [max_batch]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.captured = False

    def view(self, n: int):
        """The state of the ``n`` leading rows (views of the buffers, updated in place by steps)."""
        return [layer.rows(n) for layer in self.state]

    def load(self, state) -> None:
        n = state[0].batch_size
        if n > self.max_batch:
            raise ValueError(f"DecodeRunner: state of batch {n} exceeds max_batch={self.max_batch}")
        for buf, layer in zip(self.view(n), state):
            buf.copy_(layer)

    def compact(self, keep: Sequence[int]) -> None:
        """Move rows ``keep`` (increasing) of the buffers to the front, in that order."""
        if list(keep) == list(range(len(keep))):
            return
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.ids.device)
        n = len(keep)
        for layer in self.state:
            layer.rows(n).copy_(layer.index_select(idx))

    def _size_for(self, n: int) -> int:
        if self.cuda_graphs:
            return next(m for m in self.sizes if m >= n)
        return self.model.invariance.step_rows(n)

    def _steps(self, m: int) -> torch.Tensor:
        """The work one replay does for the ``m`` leading rows (captured as is)."""
        state = self.view(m)
        if not self.greedy_steps:
            return self.model.step(self.ids[:m], state).float()
        ids = self.ids[:m]
        for j in range(self.greedy_steps):
            ids = self.model.step(ids, state).argmax(dim=-1)
            self.chosen[:m, j].copy_(ids)
        return self.chosen[:m]

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Record a graph per ladder size (once). The buffers are zeroed afterwards: call before ``load``."""
        if not self.cuda_graphs or self.captured:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream (kernel compilation, allocator)
            for m in self.sizes:
                for _ in range(warmup):
                    for layer in self.state:  # each step fills a key/value position of attention layers
                        layer.zero_()
                    self._steps(m)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for m in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[m] = self._steps(m)
            self.graphs[m] = graph
        torch.cuda.synchronize()
        for layer in self.state:
            layer.zero_()
        self.captured = True

    def _replay(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"DecodeRunner: {n} tokens for max_batch={self.max_batch}")
        self.ids[:n].copy_(tokens)
        m = self._size_for(n)
        if m in self.graphs:
            self.graphs[m].replay()
            return self.logits[m][:n]
        return self._steps(m)[:n]

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.greedy_steps:
            raise ValueError("DecodeRunner.run: this runner decodes greedily (use run_greedy)")
        return self._replay(tokens)

    def run_greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.greedy_steps:
            raise ValueError("DecodeRunner.run_greedy: this runner returns logits (use run)")
        return self._replay(tokens)


#: Greedy tokens decoded per replay (per host look at the tokens) with CUDA graphs.
GREEDY_STEPS = 8
#: Runners kept per model (each holds a state buffer of its batch size and its graphs).
_MAX_RUNNERS = 4
_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_length(need: int) -> int:
    """Key/value cache positions for ``need``: the next power of two, at least 256, so that
    runners (and their graphs) are reused across calls with similar lengths."""
    return max(256, 1 << (need - 1).bit_length())


def decode_runner(model, max_batch: int, *, cuda_graphs: bool, greedy_steps: int,
                  max_length: int | None = None, state_dtype: torch.dtype = torch.float32) -> DecodeRunner:
    """A captured :class:`DecodeRunner` for ``model``, reused while the model's tensors stay where
    they are (a few per model, the most recently used kept). ``max_length``: positions a sequence
    may reach, for models with attention layers (ignored otherwise); a runner whose key/value
    caches are shorter is replaced. ``state_dtype``: storage of the SSM states (see
    ``LanguageModel.allocate_state``)."""
    grows = model.state_grows
    length = _cache_length(max_length) if grows and max_length else None
    # The buffers' rows follow the invariance policy, which on the CPU depends on the thread count.
    key = (max_batch, cuda_graphs, greedy_steps, state_dtype, model.weights_key(),
           model.invariance.step_rows(max_batch))
    table = _runners.setdefault(model, {})
    runner = table.pop(key, None)
    if runner is not None and grows and (runner.max_length or 0) < (length or 0):
        runner = None
    if runner is None:
        runner = DecodeRunner(model, max_batch, cuda_graphs=cuda_graphs, greedy_steps=greedy_steps,
                              max_length=length, state_dtype=state_dtype)
        runner.capture()
    table[key] = runner  # most recent last
    while len(table) > _MAX_RUNNERS:
        del table[next(iter(table))]
    return runner


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
    is_stopped: Callable[[list[int]], bool] | None = None,
    batch_size: int = 16,
    device: torch.device,
    cuda_graphs: bool | None = None,
    greedy_steps: int | None = None,
    prefill_chunk: int = 16384,
    state_dtype: torch.dtype = torch.float32,
    mixed_lengths: bool = True,
    times: GenerateTimes | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    ``is_stopped(tokens)`` is asked after every new token (the generated tokens only) and ends
    that sequence when true; the stop string itself is trimmed by the caller. The EOS token is
    not included in the output. Results are in the order of ``prompts``. ``cuda_graphs`` (default:
    on for a CUDA device) replays captured graphs. Greedy decoding looks at the tokens every
    ``greedy_steps`` steps (default :data:`GREEDY_STEPS` with CUDA graphs, else 1): a sequence
    that ends inside such a block costs the rest of the block, and its output is exactly what
    one step at a time gives. A prompt longer than ``prefill_chunk`` tokens is run in chunks of
    that many that carry the recurrent state (memory flat in the prompt's length).
    ``state_dtype`` is the storage of the SSM states between decoding steps (fp32 by default;
    ``torch.bfloat16`` halves the state traffic of large batches, as mamba_ssm's cache does).
    ``mixed_lengths`` (default true) lets prompts of different lengths share a right-padded
    prefill (module docstring); false prefills only prompts of equal length together. ``times``,
    if given, is added the time and work of the prefill and of decoding (:class:`GenerateTimes`).
    """
    if prefill_chunk < 1:
        raise ValueError(f"generate: prefill_chunk must be at least 1, got {prefill_chunk}")
    if batch_size < 1:
        raise ValueError(f"generate: batch_size must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt (lm-eval supplies at least one token)")
    generator = None
    if not params.greedy and params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    seqs = [_Seq(i, list(p)) for i, p in enumerate(prompts)]
    if max_new_tokens <= 0 or not seqs:
        return [s.out for s in seqs]
    if cuda_graphs is None:
        cuda_graphs = torch.device(device).type == "cuda"
    if not params.greedy:
        greedy_steps = 0
    elif greedy_steps is None:
        greedy_steps = GREEDY_STEPS if cuda_graphs else 1
    # Positions a sequence may reach: a greedy block can run past max_new_tokens.
    need = max(len(s.prompt) for s in seqs) + max_new_tokens + max(1, greedy_steps)
    runner = decode_runner(model, min(batch_size, len(seqs)), cuda_graphs=cuda_graphs,
                           greedy_steps=max(0, greedy_steps), max_length=need, state_dtype=state_dtype)
    lengths = [len(s.prompt) for s in seqs]
    mixable = [mixed_lengths and can_share_padded_pass(model, n, prefill_chunk) for n in lengths]
    for group in prefill_groups(lengths, batch_size, mixable=mixable):
        _generate_group(model, runner, [seqs[i] for i in group], max_new_tokens, params, eos_id, is_stopped, generator,
                        torch.device(device), prefill_chunk, times)
    return [s.out for s in seqs]


def prefill_groups(lengths: Sequence[int], batch_size: int, *, mixable: Sequence[bool]) -> list[list[int]]:
    """The prefill groups of prompts of these ``lengths``: lists of at most ``batch_size``
    indices into ``lengths``, the groups in order of decreasing length and each group's indices
    too (equal lengths in their given order).

    The prompts marked ``mixable`` (those that ``can_share_padded_pass``) fill groups of mixed
    lengths in order of decreasing length, a new group starting when the next prompt would take
    the group's padded area (rows x its first, longest, length) past :data:`MAX_PADDING_RATIO`
    times its real tokens; the other prompts keep groups of one length (module docstring).
    """
    exact: dict[int, list[int]] = {}
    mixed: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
        n = lengths[i]
        if mixable[i]:
            mixed.append(i)
        else:
            exact.setdefault(n, []).append(i)
    groups = [b[lo:lo + batch_size] for b in exact.values() for lo in range(0, len(b), batch_size)]
    group: list[int] = []
    real = 0
    for i in mixed:
        n = lengths[i]
        if group and (len(group) == batch_size
                      or (len(group) + 1) * lengths[group[0]] > MAX_PADDING_RATIO * (real + n)):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n
    if group:
        groups.append(group)
    groups.sort(key=lambda g: -lengths[g[0]])  # stable
    return groups


def _accept(s: _Seq, tok: int, max_new_tokens: int, eos_id, is_stopped) -> bool:
    """Take one generated token for ``s``; returns whether the sequence goes on."""
    if eos_id is not None and tok == eos_id:
        s.done = True
        return False
    s.out.append(tok)
    if len(s.out) >= max_new_tokens or (is_stopped is not None and is_stopped(s.out)):
        s.done = True
    return not s.done


def _prefill(model, prompts: list[list[int]], chunk: int, times: GenerateTimes | None):
    """The hidden state at each prompt's last position [B, D] and the state after each prompt.

    Prompts of one length run as they are, in chunks of ``chunk`` positions that carry the
    state. Prompts of different lengths (each at most ``chunk``) run in one forward padded on
    the right, with their lengths: the state of each row is taken after its own last token, and
    its hidden state at its own last position. Under a CPU batch-invariance policy the forward
    gets filler rows (``padded_shape``); their states are dropped.
    """
    n = len(prompts)
    lengths = np.fromiter(map(len, prompts), np.int64, n)
    width = int(lengths.max())
    ragged = int(lengths.min()) != width
    if ragged and width > chunk:
        raise ValueError(f"_prefill: prompts of different lengths up to {width} exceed the chunk of {chunk}")
    policy = model.invariance
    total, cols = padded_shape(n, width, chunk, policy.min_rows(), policy.alignment(), fixed_length=not ragged)
    pad = 0  # any token id: padded positions change no state and their outputs are not read
    ids = np.full((total, cols), pad, np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
    row_lengths = np.concatenate([lengths, np.full(total - n, cols, np.int64)]) if ragged else None
    out = model.run_rows(ids, keep=(np.arange(n, dtype=np.int64), lengths - 1), lengths=row_lengths,
                         return_state=True, chunk=max(chunk, cols) if ragged else chunk)
    state = out.state if total == n else [layer.rows(n) for layer in out.state]
    if times is not None:
        times.prefill_forwards += len(out.widths)
        times.padded_prefill_tokens += total * sum(out.widths)
        times.prefill_tokens += int(lengths.sum())
    return out.hidden, state


def _generate_group(model, runner, group, max_new_tokens, params, eos_id, is_stopped, generator, device,
                    prefill_chunk, times):
    start = time.perf_counter()
    last, state = _prefill(model, [s.prompt for s in group], prefill_chunk, times)
    runner.load(state)
    del state
    # The first token's LM head gets the rows of a decoding step (filler rows on the CPU under a
    # batch-invariance policy), so that it does not depend on the group's size either.
    n = last.shape[0]
    rows = model.invariance.step_rows(n)
    if rows > n:
        last = torch.cat([last, last.new_zeros(rows - n, last.shape[1])])
    logits = model.lm_logits(last)[:n]
    next_ids = sample_next(logits, params, generator)
    if times is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # else the first read of tokens would count the prefill as decoding
    started = time.perf_counter()
    steps = _decode(runner, group, next_ids, max_new_tokens, params, eos_id, is_stopped, generator, device)
    if times is not None:
        times.prefill_s += started - start
        times.decode_s += time.perf_counter() - started
        times.decode_steps += steps


def _decode(runner, group, next_ids, max_new_tokens, params, eos_id, is_stopped, generator, device) -> int:
    """Decode ``group`` (its states loaded in the runner's leading rows, ``next_ids`` its first
    tokens) until every sequence is done; returns the batch steps run."""
    steps = 0
    live = list(range(len(group)))  # live[i]: the sequence in row i of the runner's buffers
    while True:
        if runner.greedy_steps:
            # next_ids feeds the block; the block's chosen tokens follow it.
            block = torch.cat([next_ids[:, None], runner.run_greedy(next_ids)], dim=1)
            steps += runner.greedy_steps
            rows = block.tolist()  # the one host sync per block: EOS and stop strings
            tokens = [row[:-1] for row in rows]  # the last is the input of the next block
            carry = [row[-1] for row in rows]
        else:
            tokens = [[t] for t in next_ids.tolist()]  # the one host sync per step
        keep = []  # positions (in live) of the sequences that go on
        for pos, (row, toks) in enumerate(zip(live, tokens)):
            s = group[row]
            if all(_accept(s, tok, max_new_tokens, eos_id, is_stopped) for tok in toks):
                keep.append(pos)
        if not keep:
            return steps
        if runner.greedy_steps:
            next_ids = torch.tensor([carry[p] for p in keep], dtype=torch.long, device=device)
        elif len(keep) < len(live):
            next_ids = next_ids.index_select(0, torch.as_tensor(keep, dtype=torch.long, device=next_ids.device))
        if len(keep) < len(live):
            runner.compact(keep)
            live = [live[p] for p in keep]
        if not runner.greedy_steps:
            next_ids = sample_next(runner.run(next_ids), params, generator)
            steps += 1


def tail_stop_checker(decode: Callable[[list[int]], str], stops: Sequence[str]) -> Callable[[list[int]], bool]:
    """``is_stopped`` for ``generate`` that decodes only a tail of the generated tokens.

    Asked after every new token, it answers as ``any(s in decode(tokens) for s in stops)`` would
    at the first token where that becomes true. A stop string newly present in the full text ends
    within the characters that changed with the last token (its own text, plus the characters of
    an earlier partial multi-byte character it completes), so it lies within the last
    ``len(stop) + len(decode(last token)) + 4`` characters. The window of tokens doubles until its
    text is that long, or covers everything; characters spoilt by starting the window inside a
    multi-byte character (U+FFFD) are dropped from its front.
    """
    stops = [s for s in stops if s]
    if not stops:
        raise ValueError("tail_stop_checker: no non-empty stop strings")
    longest = max(len(s) for s in stops)

    def stopped(tokens: list[int]) -> bool:
        need = longest + len(decode(tokens[-1:])) + 4
        k = min(len(tokens), need)
        while True:
            text = decode(tokens[-k:])
            if k == len(tokens):
                break
            text = text.lstrip("\ufffd")
            if len(text) >= need:
                break
            k = min(len(tokens), 2 * k)
        return any(s in text for s in stops)

    return stopped
