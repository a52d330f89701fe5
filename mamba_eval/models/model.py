"""A language model of the Mamba family, forward only: embedding, blocks, final norm, LM head.

The parameter names are mamba_ssm's ``LanguageModel``'s, so its checkpoints load without
renaming (``mamba_eval.models.formats`` maps the other formats onto these names)::

    backbone.embedding                                        token embedding        [V, D]
    backbone.layers.i.norm       pre-norm (fused with the residual add)
    backbone.layers.i.mixer      the layer's mixer (``mamba_eval.models.mixers``)
    backbone.layers.i.norm2/mlp  pre-norm and gated MLP after the mixer, when the layer has one
    backbone.layers.i.shared_use a layer's use of a shared block (Zamba2: ``mamba_eval.models.shared``)
    backbone.shared.b            the shared blocks
    backbone.norm_f              final norm
    lm_head                      [V, D], the embedding itself when tie_embeddings

A block computes ``residual = x + residual; x = mixer(norm(residual))`` and then, with an MLP
(or a mixture of experts), ``residual = x + residual; x = mlp(norm2(residual))``; each branch's x
is scaled by ``config.residual_multiplier`` before it joins the stream, the embedding output by
``embedding_multiplier`` and the logits by ``logits_multiplier`` (all 1 but for Granite 4.0-H);
the residual stream is kept in fp32 when ``config.residual_in_fp32``. The SSM parameters
(``A_log``, ``D`` and the Δ bias) stay fp32 whatever the model dtype, as the scans consume them
in fp32.

The interface the scoring engine and generation use, and nothing else of the model:

- :meth:`LanguageModel.run_rows` (``mamba_eval.models.rows``): rows of tokens, with optional
  initial states and per-row lengths, chunked for long inputs -> hidden states at chosen
  positions and the final states. :meth:`~LanguageModel.backbone_forward` is its one-pass core.
- :meth:`~LanguageModel.lm_logits`: fp32 logits of hidden states.
- :meth:`~LanguageModel.allocate_state` and :meth:`~LanguageModel.step`: a decode cache and one
  token per sequence, in place. A state is a list of per-layer state objects that fork, select,
  copy and reset themselves (``mamba_eval.models.state``).
- :attr:`~LanguageModel.invariance` (``mamba_eval.models.invariance``), :attr:`~LanguageModel.cost`
  (bytes and FLOPs per token, state bytes: for batching), :attr:`~LanguageModel.supports_lengths`,
  :attr:`~LanguageModel.state_grows`, :meth:`~LanguageModel.weights_key`.

Operators come from a backend chosen once at construction (``mamba_eval.models.ops.get_ops``),
under the model's batch-invariance policy; decoding steps use ``ops.step_linear`` for their
matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.config import LayerConfig, ModelConfig, MoEConfig
from mamba_eval.models.invariance import Invariance
from mamba_eval.models.layers import GatedMLP, MoE, Norm
from mamba_eval.models.mixers import build_mixer
from mamba_eval.models.mixers.parallel import PairState
from mamba_eval.models.mixers.ssm import padding_mask
from mamba_eval.models.ops import Ops, get_ops
from mamba_eval.models.rows import run_rows
from mamba_eval.models.shared import SharedBlock, SharedUse
from mamba_eval.models.state import ModelState


@dataclass(frozen=True)
class CostHints:
    """What batching needs to know of a model, per sequence and per token.

    ``token_bytes``: activation bytes per token of a forward (the residual stream and normed input
    in fp32, and the largest mixer's temporaries: layers run one at a time; plus the key/value
    bytes a token adds in attention layers). ``state_bytes``: one sequence's recurrent state, all
    layers. ``kv_bytes``: what that state grows by per position (attention layers). ``logit_row_bytes``:
    one row of fp32 logits with its log-softmax and temporaries. ``flops_per_token``: 2 per weight
    of the layers (the embedding and the LM head do not run per position)."""

    token_bytes: int
    state_bytes: int
    kv_bytes: int
    logit_row_bytes: int
    flops_per_token: int


class Block(nn.Module):
    """``residual = x + residual; x = mixer(norm(residual))`` (add and norm fused, as in mamba_ssm),
    then with an MLP ``residual = x + residual; x = mlp(norm2(residual))``. A layer that uses a
    shared block (``shared_use``, Zamba2's hybrid layers) feeds its mixer ``norm(residual + t)``,
    ``t`` the shared block's output on the stream and the embeddings (``mamba_eval.models.shared``).

    The block is the unit of state the model sees: the mixer's, or with a shared block the
    :class:`PairState` of the use's key/value cache (``attn``) and the mixer's state (``ssm``);
    :attr:`state_type`, :meth:`zero_state` and the cost methods answer for the whole block."""

    def __init__(self, layer: LayerConfig, config: ModelConfig, ops: Ops, **factory):
        super().__init__()
        self.ops = ops
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)
        self.mixer = build_mixer(layer.mixer, config.d_model, ops, **factory)
        self.scale = config.residual_multiplier  # of each branch's output, before the residual add
        self.norm2 = self.mlp = None
        if isinstance(layer.mlp, MoEConfig):
            m = layer.mlp
            self.norm2 = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)
            self.mlp = MoE(config.d_model, m, ops, **factory)
        elif layer.mlp is not None:
            self.norm2 = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)
            self.mlp = GatedMLP(config.d_model, layer.mlp.d_intermediate, **factory)
        self.shared_use = None
        if layer.shared is not None:
            self.shared_use = SharedUse(layer.shared, config.shared_blocks[layer.shared.block], config.d_model,
                                        **factory)

    # -- the state of the block

    @property
    def state_type(self) -> type:
        return self.mixer.state_type if self.shared_use is None else PairState

    @property
    def supports_lengths(self) -> bool:
        return self.mixer.supports_lengths and self.shared_use is None

    @property
    def state_grows(self) -> bool:
        return self.mixer.state_grows or self.shared_use is not None

    def zero_state(self, batch_size: int, **kwargs):
        state = self.mixer.zero_state(batch_size, **kwargs)
        if self.shared_use is None:
            return state
        return PairState(self.shared_use.zero_state(batch_size, **kwargs), state)

    def state_bytes(self, elem: int) -> int:
        return self.mixer.state_bytes(elem)

    def kv_bytes(self, elem: int) -> int:
        return self.mixer.kv_bytes(elem) + (0 if self.shared_use is None else self.shared_use.kv_bytes(elem))

    def activation_bytes(self) -> int:
        shared = 0 if self.shared_use is None else self.shared_use.activation_bytes()
        return max(self.mixer.activation_bytes(), shared)

    # -- computation

    def _scaled(self, x):
        return x if self.scale == 1.0 else x * self.scale

    def _mlp(self, x, residual, linear, step: bool):
        x = self._scaled(x)
        if self.mlp is None:
            return x, residual
        x, residual = self.norm2.add_norm(self.ops, x, residual, self.residual_in_fp32)
        return self._scaled((self.mlp.step if step else self.mlp)(x, linear)), residual

    def _with_shared(self, t, residual):
        """The mixer's input ``norm(residual + t)``; the stream stays ``residual``."""
        x, _ = self.norm.add_norm(self.ops, t, residual, self.residual_in_fp32)
        return x

    def forward(self, x, residual, state, embedded=None, shared=None, **mixer_args):
        """``mixer_args``: the mixer's ``lengths`` and ``padded`` (see ``backbone_forward``);
        ``embedded`` (the embedding output) and ``shared`` (the model's shared blocks) for a layer
        with a ``shared_use``. Returns the branch output already scaled by the residual multiplier."""
        x, residual = self.norm.add_norm(self.ops, x, residual, self.residual_in_fp32)
        if self.shared_use is None:
            x, state = self.mixer(x, state, **mixer_args)
        else:
            block = shared[self.shared_use.cfg.block]
            t, attn_state = block(residual, embedded, self.shared_use, None if state is None else state.attn)
            x, ssm_state = self.mixer(self._with_shared(t, residual), None if state is None else state.ssm,
                                      **mixer_args)
            state = PairState(attn_state, ssm_state)
        x, residual = self._mlp(x, residual, self.ops.linear, step=False)
        return x, residual, state

    def step(self, x, residual, state, embedded=None, shared=None):
        x, residual = self.norm.add_norm(self.ops, x, residual, self.residual_in_fp32)
        if self.shared_use is None:
            x = self.mixer.step(x, state)
        else:
            t = shared[self.shared_use.cfg.block].step(residual, embedded, self.shared_use, state.attn)
            x = self.mixer.step(self._with_shared(t, residual), state.ssm)
        return self._mlp(x, residual, self.ops.step_linear, step=True)


class Backbone(nn.Module):
    """Embedding, the blocks, the shared blocks (Zamba2; none elsewhere) and the final norm
    (mamba_ssm's ``MixerModel``)."""

    def __init__(self, config: ModelConfig, ops: Ops, **factory):
        super().__init__()
        # Given its tensor, nn.Embedding skips its own normal_ initialisation: on the meta device
        # that call alone would import torch._dynamo, seconds of every model load. On a real
        # device the draw is made as nn.Embedding makes it, so that seeded models (tests, the
        # shipped probe model's training) keep their random stream.
        self.embedding = nn.Embedding(config.vocab_size, config.d_model,
                                      _weight=torch.empty(config.vocab_size, config.d_model, **factory))
        if self.embedding.weight.device.type != "meta":
            nn.init.normal_(self.embedding.weight)
        self.layers = nn.ModuleList(Block(layer, config, ops, **factory) for layer in config.layers)
        self.shared = nn.ModuleList(SharedBlock(b, config.d_model, config.norm_eps, ops, **factory)
                                    for b in config.shared_blocks)
        self.norm_f = Norm(config.d_model, config.rms_norm, config.norm_eps, **factory)


class LanguageModel(nn.Module):
    """A language model of the Mamba family (module docstring); forward only (parameters do not
    require grad).

    ``backend`` names the operator implementations (``mamba_eval.models.ops``); ``dtype`` is the
    dtype of the weights and activations (the SSM parameters stay fp32); ``batch_invariant``
    builds the model's batch-invariance policy for ``device`` (``mamba_eval.models.invariance``),
    or ``invariance`` gives it whole. Build the model for the device it runs on: the policy is
    not changed by moving the model.
    On a real device the weights get mamba_ssm-style random values; on the ``meta`` device they
    are left unallocated (``mamba_eval.models.checkpoint`` materialises and fills them).
    """

    def __init__(self, config: ModelConfig, *, backend: str = "ref", device=None, dtype=None,
                 batch_invariant: bool = False, invariance: Invariance | None = None):
        super().__init__()
        self.config = config
        # The policy describes the device the model runs on (the loader builds on "meta" first).
        self.invariance = invariance or Invariance.for_device(device if device is not None else "cpu",
                                                              batch_invariant)
        self.ops = get_ops(backend, self.invariance)
        factory = {"device": device, "dtype": dtype}
        self.backbone = Backbone(config, self.ops, **factory)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, **factory)
        self.tie_weights()
        if self.backbone.embedding.weight.device.type != "meta":
            self.init_weights()
        self.requires_grad_(False)
        self.eval()

    def tie_weights(self):
        """Make ``lm_head.weight`` the embedding matrix when ``config.tie_embeddings``."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def init_weights(self):
        """Random weights in the spirit of mamba_ssm's initialisation (for tests and benchmarks)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.reset_parameters()
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):
                module.reset_parameters()
            elif isinstance(module, Norm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for layer in self.backbone.layers:
            layer.mixer.init_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    @property
    def supports_lengths(self) -> bool:
        """Whether rows of different lengths may share a forward (``backbone_forward(lengths=)``):
        not when a layer's state would hold the padding (attention's key/value cache)."""
        return all(layer.supports_lengths for layer in self.backbone.layers)

    @property
    def state_grows(self) -> bool:
        """Whether some layer's state grows with the sequence (a key/value cache): then
        ``allocate_state`` needs the longest sequence it must hold."""
        return any(layer.state_grows for layer in self.backbone.layers)

    @property
    def cost(self) -> CostHints:
        """Memory and compute per token and per sequence (:class:`CostHints`), for the model's
        dtype as it is now."""
        elem = torch.finfo(self.dtype).bits // 8
        layers = self.backbone.layers
        kv = sum(layer.kv_bytes(elem) for layer in layers)
        skip = {id(self.backbone.embedding.weight), id(self.lm_head.weight)}
        weights = sum(p.numel() for p in self.parameters() if id(p) not in skip)
        for b, block in enumerate(self.backbone.shared):  # stored once, run by each layer that uses it
            uses = len(self.config.shared_uses(b))
            weights += (uses - 1) * sum(p.numel() for p in block.parameters())
        for moe in (m for layer in self.backbone.layers for m in (layer.mixer, layer.mlp) if isinstance(m, MoE)):
            weights -= round((1 - moe.active_fraction()) * (moe.fc1.numel() + moe.fc2.numel()))  # only chosen experts run
        return CostHints(
            token_bytes=4 * 3 * self.config.d_model + max(layer.activation_bytes() for layer in layers) + kv,
            state_bytes=sum(layer.state_bytes(elem) for layer in layers),
            kv_bytes=kv,
            logit_row_bytes=3 * 4 * self.config.vocab_size,
            flops_per_token=2 * weights,
        )

    def weights_key(self) -> tuple:
        """Changes when the model's tensors move (``.to``, reloading), which a captured CUDA graph
        would not see."""
        return tuple(p.data_ptr() for p in (self.backbone.embedding.weight, self.lm_head.weight)) + (
            self.device, self.dtype)

    def _check_state(self, state: ModelState, batch_size: int):
        if len(state) != self.config.n_layer:
            raise ValueError(f"state has {len(state)} layers, the model has {self.config.n_layer}")
        if state and state[0].batch_size != batch_size:
            raise ValueError(f"state is for batch size {state[0].batch_size}, input_ids for {batch_size}")
        for i, (layer, layer_state) in enumerate(zip(self.backbone.layers, state)):
            expected = layer.state_type
            if not isinstance(layer_state, expected):
                raise ValueError(
                    f"state of layer {i} is a {type(layer_state).__name__}, the layer needs a {expected.__name__}"
                )

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.backbone.embedding.weight)
        m = self.config.embedding_multiplier
        return x if m == 1.0 else x * m

    def backbone_forward(
        self, input_ids: torch.Tensor, state: ModelState | None = None, return_state: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ModelState | None]:
        """input_ids [B, L] -> (hidden [B, L, D] after norm_f in model dtype, final state or None).

        ``state`` is the state before ``input_ids[:, 0]`` (zeros when None); it is not modified.

        ``lengths`` (with ``return_state``): a LongTensor [B] on the model's device of the rows'
        real lengths, ``1 <= lengths[b] <= L`` (not checked: that would read device values), the
        rest of a row being padding. The returned state of row b is then its state after
        position ``lengths[b] - 1``, the same bits as the final state of the row in a forward of
        its own length: Δ is set to ``-inf`` before its bias and softplus at the padded positions
        (softplus gives exactly 0 there, and the scan carries the state through unchanged) and
        the conv state is gathered from the conv inputs before ``lengths[b]``. Hidden states at
        real positions are those without ``lengths`` (the model is causal). One exception: the
        Mamba-2 reference scan (``kernels.ssd.ssd_scan_ref``) from a nonzero initial ``state``
        agrees to fp32 rounding only (it sums the chunks' contributions in one product whose
        length is the chunk count); from zeros, and in the Triton kernels, bits agree (tested in
        ``tests/test_lengths.py``). Only for models that :attr:`supports_lengths` (ValueError).
        """
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if state is not None:
            self._check_state(state, input_ids.shape[0])
        mixer_args = {}
        if lengths is not None:
            if not self.supports_lengths:
                raise ValueError(
                    "lengths is not supported for models with attention layers: their key/value caches "
                    "would hold the padding; run rows of equal length instead"
                )
            if not return_state:
                raise ValueError("lengths is only meaningful with return_state=True")
            if lengths.ndim != 1 or lengths.shape[0] != input_ids.shape[0] or lengths.dtype != torch.long:
                raise ValueError(
                    f"lengths must be a LongTensor [B={input_ids.shape[0]}], got {lengths.dtype} {tuple(lengths.shape)}"
                )
            if lengths.device != input_ids.device:
                raise ValueError(f"lengths is on {lengths.device}, input_ids on {input_ids.device}")
            mixer_args = {"lengths": lengths, "padded": padding_mask(lengths, input_ids.shape[1])}
        x, residual = self._embed(input_ids), None
        if self.config.shared_blocks:
            mixer_args.update(embedded=x, shared=self.backbone.shared)
        final_states = [] if return_state else None
        for i, layer in enumerate(self.backbone.layers):
            x, residual, layer_state = layer(x, residual, None if state is None else state[i], **mixer_args)
            if return_state:
                final_states.append(layer_state)
        hidden, _ = self.backbone.norm_f.add_norm(self.ops, x, residual, self.config.residual_in_fp32)
        return hidden, final_states

    def run_rows(self, ids, **kwargs):
        """Rows of tokens, chunked and/or ragged, in the one way both scoring and generation run
        them: :func:`mamba_eval.models.rows.run_rows` (its docstring has the arguments)."""
        return run_rows(self, ids, **kwargs)

    def lm_logits(self, hidden: torch.Tensor, linear=None) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] in fp32 (matmul in the weight dtype), over all stored
        rows; ``linear`` (default ``ops.linear``) is the matrix product used."""
        weight = self.lm_head.weight
        logits = (linear or self.ops.linear)(hidden.to(weight.dtype), weight).float()
        m = self.config.logits_multiplier
        return logits if m == 1.0 else logits * m

    def forward(
        self, input_ids: torch.Tensor, state: ModelState | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, ModelState | None]:
        """input_ids [B, L] -> (logits [B, L, V] fp32, final state if ``return_state`` else None)."""
        hidden, final_state = self.backbone_forward(input_ids, state, return_state)
        return self.lm_logits(hidden), final_state

    def allocate_state(self, batch_size: int, max_length: int | None = None,
                       state_dtype: torch.dtype = torch.float32) -> ModelState:
        """A zero state (the state before any token) for ``batch_size`` sequences.

        ``max_length``: the most positions a sequence will reach (prompt and generated tokens);
        required when a layer's state grows (:attr:`state_grows`: attention's key/value caches
        are preallocated for that many positions), ignored otherwise.
        ``state_dtype``: storage of the SSM states (fp32 by default; the step's math is fp32
        either way). A 16-bit state halves the bytes a decoding step reads and writes, which
        is what bounds large-batch decoding; mamba_ssm's inference cache keeps it in the
        model's dtype.
        """
        return [layer.zero_state(batch_size, capacity=max_length, dtype=self.dtype, state_dtype=state_dtype,
                                 device=self.device)
                for layer in self.backbone.layers]

    def step(self, input_ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """One token per sequence: input_ids [B] -> logits [B, V] fp32; advances ``state`` IN PLACE."""
        if input_ids.ndim != 1:
            raise ValueError(f"step takes one token per sequence, input_ids [B]; got shape {tuple(input_ids.shape)}")
        self._check_state(state, input_ids.shape[0])
        x, residual = self._embed(input_ids), None
        shared = {"embedded": x, "shared": self.backbone.shared} if self.config.shared_blocks else {}
        for layer, layer_state in zip(self.backbone.layers, state):
            x, residual = layer.step(x, residual, layer_state, **shared)
        hidden, _ = self.backbone.norm_f.add_norm(self.ops, x, residual, self.config.residual_in_fp32)
        return self.lm_logits(hidden, self.ops.step_linear)

