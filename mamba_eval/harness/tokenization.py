"""Tokenisation for the lm-eval adapter: the token ids lm-eval's HF models make, for many
strings at once.

:class:`BatchTokenizer` wraps a Hugging Face tokenizer. Its ``encode`` is lm-eval's
``tok_encode``; ``encode_many`` gives the same ids for a list of strings in one call of the Rust
tokenizer (in threads over slices); ``encode_pairs`` makes lm-eval's (context, continuation)
token pairs of ``TemplateLM.loglikelihood`` with two or three such calls for all requests instead
of two calls per request; ``apply_chat_template`` renders a chat as lm-eval's ``hf`` model does
(``--apply_chat_template``). No lm-eval import: the rules it follows are restated where used.

(Named ``tokenization``, not ``tokenize``: a script run from this folder would otherwise shadow
the standard library's ``tokenize``, which ``inspect`` and ``linecache`` import.)
"""

from __future__ import annotations

import json
import logging
import os

from mamba_eval.errors import MambaEvalError, ModelArgsError, one_line

log = logging.getLogger(__name__)

#: The tokenizer of the Mamba releases, used when a checkpoint carries none (mamba_ssm format).
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"

# Strings per thread below which one call of the Rust tokenizer is as fast as several.
_ENCODE_CHUNK = 2048


def load_tokenizer(name: str | None, checkpoint_dir, revision: str | None = None):
    """The fast Hugging Face tokenizer ``name`` (folder or Hub id); with ``name`` None, the
    checkpoint folder's own tokenizer files (at ``revision``), else :data:`DEFAULT_TOKENIZER`.
    A tokenizer that cannot be loaded raises ``ModelArgsError`` in one line."""
    from transformers import AutoTokenizer

    from mamba_eval.models.checkpoint import has_tokenizer_files

    if name is None:
        name = str(checkpoint_dir) if has_tokenizer_files(checkpoint_dir) else DEFAULT_TOKENIZER
        rev = revision if name == str(checkpoint_dir) else None
    else:
        rev = None
    try:
        return AutoTokenizer.from_pretrained(name, revision=rev, use_fast=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelArgsError(f"cannot load tokenizer {name!r}: {first}") from None


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


class BatchTokenizer:
    """A Hugging Face tokenizer (``.tokenizer``) that encodes many strings at once.

    ``add_special_tokens`` is the default for every call (lm-eval's ``add_bos_token``): None
    leaves it to the tokenizer. Each call's ``add_special_tokens`` overrides it.

    ``bos_text``: the text of the token lm-eval's ``hf`` model puts before a document (the
    decoded ``prefix_token_id``). A string that already starts with it gets no special tokens
    when the call leaves ``add_special_tokens`` unset, as in ``hf``'s ``tok_encode``: a chat
    template that writes the BOS token itself (``{{ bos_token }}...``) must not get a second one
    from a tokenizer that adds it."""

    def __init__(self, tokenizer, add_special_tokens: bool | None = None, bos_text: str | None = None):
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.bos_text = bos_text or None
        self._encoders: dict[bool, object] = {}  # per add_special_tokens: the backend's batch encoder
        self._splits: bool | None = None

    def _special_tokens_kwargs(self, add_special_tokens: bool | None, text: str | None = None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if text is not None and self.bos_text is not None and text.startswith(self.bos_text):
            return {"add_special_tokens": False}
        if self.add_special_tokens is not None:
            return {"add_special_tokens": self.add_special_tokens}
        return {}

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """The ids of one string (lm-eval's ``tok_encode``)."""
        return self.tokenizer.encode(text, **self._special_tokens_kwargs(add_special_tokens, text))

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def encode_many(self, texts: list[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """:meth:`encode` of each string, in one call of the fast tokenizer per setting of special
        tokens (each distinct string once)."""
        groups: dict[bool | None, list[str]] = {}
        for text in dict.fromkeys(texts):
            kwargs = self._special_tokens_kwargs(add_special_tokens, text)
            groups.setdefault(kwargs.get("add_special_tokens"), []).append(text)
        table: dict[str, list[int]] = {}
        for special, unique in groups.items():
            kwargs = {} if special is None else {"add_special_tokens": special}
            backend = self._backend_encoder(kwargs)
            if backend is not None:
                ids = _encode_in_threads(backend, unique)
            else:
                ids = self.tokenizer(unique, return_attention_mask=False, **kwargs)["input_ids"]
            table.update(zip(unique, ids))
        return [table[s] for s in texts]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat (lm-eval's ``apply_chat_template``), rendered as lm-eval's
        ``hf`` model renders it: the tokenizer's chat template, untokenised, with the
        assistant's turn opened (``add_generation_prompt``) or else the last message left open
        to be continued. A template that fails with a template error (many refuse the system
        role) is rendered again without the system messages, with a warning, as ``hf`` does.

        A tokenizer without a chat template, a template that fails without the system messages
        too, or a chat transformers refuses (several templates and none named ``default``, say)
        raises ``MambaEvalError`` (``hf`` ends with transformers' traceback)."""
        import jinja2

        name = self.tokenizer.name_or_path
        if not getattr(self.tokenizer, "chat_template", None):
            raise MambaEvalError(
                f"--apply_chat_template: the tokenizer {name!r} has no chat template (instruct checkpoints "
                "carry one in tokenizer_config.json; choose such a tokenizer with model_args tokenizer=...)")

        def render(messages):
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                    continue_final_message=not add_generation_prompt)
            except ValueError as err:  # transformers' checks of the templates and the chat
                raise MambaEvalError(f"--apply_chat_template: tokenizer {name!r}: {one_line(err)}") from None

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError as err:
            log.warning("the chat template of tokenizer %r failed (%s); rendering the chat without its system "
                        "messages, as lm-eval's hf model does", name, err)
        try:
            return render([message for message in chat_history if message["role"] != "system"])
        except jinja2.exceptions.TemplateError as err:
            raise MambaEvalError(f"--apply_chat_template: the chat template of tokenizer {name!r} failed: "
                                 f"{one_line(err)}") from None

    def _backend_encoder(self, kwargs: dict):
        """The Rust tokenizer's ``encode_batch`` behind a fast tokenizer (``encode_batch_fast``
        where it exists: no character offsets), when it gives exactly the ids of
        ``self.tokenizer(...)`` (checked once per setting on probe strings): it skips
        transformers' per-string conversion, a large share of tokenising 40k requests. ``None``
        for other tokenizers, and for a backend that truncates or pads by itself."""
        key = kwargs.get("add_special_tokens", True)
        if key not in self._encoders:
            self._encoders[key] = None
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
                    self._encoders[key] = lambda texts: encode(texts, add_special_tokens=key)
        return self._encoders[key]

    def splits_before_space(self) -> bool:
        """Whether ``encode(a + b) == encode(a) + encode(b, add_special_tokens=False)`` holds for
        every ``a`` that ends in a non-whitespace character and every ``b`` that starts with a
        space (checked once, from the tokenizer's own description, see below).

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
          ``add_special_tokens``, are part of ``encode(a)``), and the backend neither
          truncates nor pads.

        (lm-eval's contexts never end in whitespace: it moves trailing whitespace to the
        continuation, and most continuations start with a space.) Any other tokenizer: ``False``.
        """
        if self._splits is None:
            self._splits = self._check_splits_before_space()
        return self._splits

    def _check_splits_before_space(self) -> bool:
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
        wholes = self.encode_many([a + b for a, b in probes])
        firsts = self.encode_many([a for a, _ in probes])
        seconds = self.encode_many([b for _, b in probes], add_special_tokens=False)
        return all(w == f + s for w, f, s in zip(wholes, firsts, seconds))

    def encode_pairs(self, pairs: list[tuple[str, str]], prefix_token_id: int) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) of each (context, continuation) string pair,
        exactly as lm-eval's ``TemplateLM.loglikelihood`` makes them, but with two or three
        tokenizer calls for all pairs instead of two per pair.

        The context's trailing whitespace moves to the continuation; the whole string and the
        context are tokenised and the continuation is the whole's tokens past the context's. An
        empty context becomes ``prefix_token_id`` (or the continuation's first token when that
        is the prefix token), with the continuation tokenised without special tokens.

        With a tokenizer that splits before a space (:meth:`splits_before_space`, true of the
        GPT-NeoX-20B tokenizer), a continuation that starts with a space is tokenised on its own
        instead of inside the whole string: the same tokens, for a fraction of the text (a
        HellaSwag context is tokenised once instead of once per ending).
        """
        split = self.splits_before_space()
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
        encoded = self.encode_many(contexts + wholes)
        ctx_ids, whole_ids = encoded[:len(contexts)], iter(encoded[len(contexts):])
        tail_ids = iter(self.encode_many(tails, add_special_tokens=False))
        bare_ids = iter(self.encode_many(bare, add_special_tokens=False))
        out: list[tuple[list[int], list[int]]] = []
        at = 0
        for i, kind in enumerate(kinds):
            if kind == 0:
                cont = next(bare_ids)
                if not cont:
                    raise MambaEvalError(f"request {i}: empty context and empty continuation")
                out.append(([prefix_token_id], cont) if prefix_token_id != cont[0] else (cont[:1], cont[1:]))
            else:
                ctx = ctx_ids[at]
                out.append((ctx, next(tail_ids) if kind == 2 else next(whole_ids)[len(ctx):]))
                at += 1
        return out
