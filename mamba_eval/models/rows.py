"""Running rows of tokens through a model: the one place where sequences are chunked, padded to
a common length, forked from states and cut back to the positions that matter. The scoring
engine (``mamba_eval.harness.engine``) and generation (``mamba_eval.harness.generation``) both
run their forwards through :func:`run_rows`.

Three rules decide how rows may share a forward:

- *Right padding.* Rows are padded on the right, where a causal model cannot see the padding.
  Hidden states at real positions are those of the row alone.
- *Per-row lengths.* A forward that returns its rows' final states can give each row its state
  after its own last token (``lengths``), the same bits as a forward of that row's length, if the
  model :attr:`~mamba_eval.models.model.LanguageModel.supports_lengths` (no attention layer,
  whose cache would hold the padding) and the row is no longer than the chunk (rows of different
  lengths would end in different chunks), and the row has at least :data:`RAGGED_MIN_LENGTH`
  tokens (:func:`can_share_padded_pass`). Other rows share a forward only with rows of their
  own length.
- *Chunks.* Rows longer than ``chunk`` positions run in chunks of that many at fixed offsets
  0, C, 2C, ..., carrying the recurrent state, and only the kept positions' hidden states are
  gathered: memory does not grow with the sequence (a million-token context runs like a short
  one).

The shapes that batch invariance asks of a forward on the CPU (filler rows, aligned positions;
``mamba_eval.models.invariance``) are :func:`forward_shape`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

#: Default chunk: rows longer than this many tokens run in chunks that carry the recurrent state.
DEFAULT_CHUNK = 16384
#: Rows shorter than this keep forwards of their own length instead of a padded pass with rows
#: of other lengths: on the CPU, a product over a strided [rows, L, K] activation (Mamba-1's
#: out_proj reads the scan output transposed) gives other last bits for L of 1-3 than for longer
#: L, so a short row would compute differently in a wide pass than in a pass of its own length.
RAGGED_MIN_LENGTH = 4


def can_share_padded_pass(model, length: int, chunk: int) -> bool:
    """Whether a row of ``length`` tokens whose final state is wanted may run in a right-padded
    forward with rows of other lengths (module docstring)."""
    return model.supports_lengths and RAGGED_MIN_LENGTH <= length <= chunk


def forward_shape(n: int, length: int, min_rows: int, align: int, fixed_length: bool) -> tuple[int, int]:
    """(rows, length) of the padded forward for ``n`` rows of up to ``length`` tokens: at least
    ``min_rows / length`` rows, and ``rows x length`` a multiple of ``align``; the least
    positions of those, with the length fixed when ``fixed_length`` (a returned state must be
    the state after the last real token), else possibly grown by padding columns."""
    best = None
    for cols in [length] if fixed_length or align == 1 else range(length, length + align):
        step = align // math.gcd(cols, align)
        rows = max(n, -(-min_rows // cols))
        rows = -(-rows // step) * step
        if best is None or rows * cols < best[0] * best[1]:
            best = (rows, cols)
    return best


def padded_shape(n: int, width: int, chunk: int, min_rows: int, align: int, fixed_length: bool) -> tuple[int, int]:
    """(rows, width) of the forward(s) of ``n`` rows of up to ``width`` tokens under the shape
    rules (:func:`forward_shape`). A width over ``chunk`` runs in chunks at fixed offsets: then
    the width stays, and the rows are enough for every chunk, the full ones and the last."""
    if width <= chunk:
        return forward_shape(n, width, min_rows, align, fixed_length)
    last = width - (width - 1) // chunk * chunk
    total = max(forward_shape(n, chunk, min_rows, align, True)[0], forward_shape(n, last, min_rows, align, True)[0])
    unit = math.lcm(align // math.gcd(chunk, align), align // math.gcd(last, align))
    return -(-total // unit) * unit, width


def ranges(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(first[i], first[i] + count[i])`` over i (int64), in one
    array operation instead of a Python loop."""
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    return np.repeat(first - (np.cumsum(count) - count), count) + np.arange(total, dtype=np.int64)


def upload(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The int64 host arrays as tensors on ``device``, in one copy. The copy is non-blocking
    from pageable memory: it returns once the driver has staged the bytes, with no stream
    synchronisation (a blocking one waits for all queued work; pinning each small tensor first
    costs more than it saves)."""
    sizes = [a.size for a in arrays]
    host = torch.from_numpy(np.concatenate(arrays) if len(arrays) != 1 else np.ascontiguousarray(arrays[0]))
    if device.type != "cpu":
        host = host.to(device, non_blocking=True)
    return list(host.split(sizes))


@dataclass
class RowsOutput:
    """What :func:`run_rows` returns: the hidden states at the kept positions ``[P, D]`` (in the
    order of ``keep``), the final state (or None), the ``extra`` arrays on the device, and the
    width of each forward run (for the callers' counters)."""

    hidden: torch.Tensor
    state: list | None
    extra: list[torch.Tensor]
    widths: list[int] = field(default_factory=list)


def run_rows(
    model, ids: np.ndarray | Callable[[int, int], np.ndarray], *, width: int | None = None,
    keep: tuple[np.ndarray, np.ndarray], state=None, owners: np.ndarray | None = None,
    lengths: np.ndarray | None = None, return_state: bool = False, chunk: int = DEFAULT_CHUNK,
    extra: Sequence[np.ndarray] = (),
) -> RowsOutput:
    """Run rows of token ids through ``model`` (module docstring).

    ``ids``: the padded rows, an int64 host array ``[R, W]``, or a function ``ids(lo, hi)`` that
    returns columns ``lo .. hi - 1`` of them (with ``width`` = W), so that a long row is never
    held whole on the host. ``keep``: host int64 arrays ``(rows, cols)`` of the positions whose
    hidden states are returned. ``state``: a model state to start from, row ``r`` from its row
    ``owners[r]`` (forked; ``owners`` None: row r from row r). ``lengths`` (host int64 [R], with
    ``return_state``, only for rows that :func:`can_share_padded_pass`): the final state of row r
    is its state after its own ``lengths[r]`` tokens. ``return_state``: return the final state,
    that of the last column for every row unless ``lengths`` is given. ``chunk``: rows wider than
    this run in chunks of it. ``extra``: int64 host arrays to bring to the device with the rows
    (one copy).
    """
    device = model.device
    if callable(ids):
        if width is None:
            raise ValueError("run_rows: ids given as a function needs its width")
        columns = ids
    else:
        width = ids.shape[1]
        columns = lambda lo, hi: ids[:, lo:hi]  # noqa: E731
    keep_rows, keep_cols = keep
    forks = [owners] if state is not None and owners is not None else []
    if width <= chunk:
        block = np.ascontiguousarray(columns(0, width), dtype=np.int64)
        n_rows = block.shape[0]
        row_lengths = [lengths] if lengths is not None else []
        dev = upload([block.reshape(-1), keep_rows * width + keep_cols, *forks, *row_lengths, *extra], device)
        if forks:
            state = [layer.index_select(dev[2]) for layer in state]
        kwargs = {"lengths": dev[2 + len(forks)]} if lengths is not None else {}
        hidden, final = model.backbone_forward(dev[0].view(n_rows, width), state=state, return_state=return_state,
                                               **kwargs)
        picked = hidden.flatten(0, 1).index_select(0, dev[1])
        return RowsOutput(picked, final, dev[len(dev) - len(extra):], [width])
    if lengths is not None:
        raise ValueError(f"run_rows: rows of different lengths must fit one chunk ({width} > {chunk} positions)")
    extra_dev = upload(extra, device) if len(extra) else []
    picked = torch.empty(len(keep_rows), model.config.d_model, dtype=model.dtype, device=device)
    widths = []
    for lo in range(0, width, chunk):
        hi = min(width, lo + chunk)
        block = np.ascontiguousarray(columns(lo, hi), dtype=np.int64)
        n_rows = block.shape[0]
        sel = np.flatnonzero((keep_cols >= lo) & (keep_cols < hi))
        dev = upload([block.reshape(-1), sel, keep_rows[sel] * (hi - lo) + keep_cols[sel] - lo,
                      *(forks if lo == 0 else [])], device)
        if lo == 0 and forks:
            state = [layer.index_select(dev[3]) for layer in state]
        hidden, state = model.backbone_forward(dev[0].view(n_rows, hi - lo), state=state,
                                               return_state=return_state or hi < width)
        if len(sel):
            picked.index_copy_(0, dev[1], hidden.flatten(0, 1).index_select(0, dev[2]))
        del hidden
        widths.append(hi - lo)
    return RowsOutput(picked, state if return_state else None, extra_dev, widths)
