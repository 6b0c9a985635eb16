"""`gptcore.LLM`: a language model and its tokenizer in one object (as `litgpt.LLM`): load once, then
generate, chat and stream text.

    llm = gptcore.LLM.load("models/instruct/model.safetensors")
    llm.generate("Every effort moves you", max_new_tokens=20, temperature=0.8, top_k=40, seed=1)
    llm.chat([{"role": "user", "content": "Name a primary color."}])
    for piece in llm.stream("Every effort moves you"): ...

Decoding is gptcore.inference.decoding.generate with the sampler of gptcore.inference.sampling (the tokens
`gptcore.generate` gives for the same options); a chat is rendered by the one chat template,
gptcore.prompt.render_chat, as `gptcore serve` renders /api/chat and /v1/chat/completions; text is released
by the server's detokenizer (gptcore.serve.chat.Detokenizer): whole characters only, stop strings held back
and cut. Every option is checked before anything is decoded; an unknown one is refused, never ignored.
`gptcore chat` (gptcore/chat.py) is a terminal loop around this object.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from gptcore.errors import GptcoreError
from gptcore.inference.decoding import cast_for_inference, generate, resolve_decoding_precision
from gptcore.inference.quantize import check_quantize
from gptcore.inference.sampling import SamplingOptions
from gptcore.model import GPTModel
from gptcore.precision import autocast
from gptcore.prompt import CHAT_ROLES, render_chat
from gptcore.serve.chat import Detokenizer
from gptcore.serve.jobs import budget
from gptcore.tokenizer import EOT_ID, encode_text, get_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 50  # as `gptcore generate`
SAMPLING_OPTIONS = tuple(f.name for f in fields(SamplingOptions))
OPTIONS = (*SAMPLING_OPTIONS, "max_new_tokens", "stop")
MAX_STOPS = 16  # as the server (gptcore.serve.options.checked_sampling)


@dataclass(frozen=True)
class Options:
    """A call's options, checked: the sampler's, the new-token budget, the stop strings."""

    sampling: SamplingOptions
    max_new_tokens: int
    stop: tuple[str, ...]


def check_options(options: Mapping[str, Any], vocab_size: int, allowed: Sequence[str] = OPTIONS) -> Options:
    """The options of one call (gptcore.inference.sampling's, `max_new_tokens`, `stop`), checked as the
    server checks a request's: a ValueError naming the first unknown or bad option.

    `stop` is a string or a list of at most 16 strings; generation ends before the first one (not included).
    """
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; the options are: {', '.join(allowed)}")
    max_new = options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new!r}")
    stop = options.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of at most {MAX_STOPS} strings, got {stop!r:.80}")
    bias = options.get("logit_bias") or {}
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    outside = [t for t in bias if isinstance(t, int) and not isinstance(t, bool) and t >= vocab_size]
    if outside:
        raise ValueError(f"logit_bias: token ids are integers from 0 to {vocab_size - 1}, got {outside[0]}")
    sampling = SamplingOptions(**{k: v for k, v in options.items() if k in SAMPLING_OPTIONS and v is not None})
    return Options(sampling, max_new, tuple(stop))


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """OpenAI-style messages as the chat template's {role, content} (a `developer` message is a system
    one; text parts of a content list are joined by newlines, as the server joins them); ValueError
    naming the first bad message."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role: expected one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = m.get("content") or ""
        if isinstance(content, list):
            if not all(
                isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ValueError(
                    f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported"
                )
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def load_for_decoding(
    path: str | os.PathLike,
    adapter: str | os.PathLike | None,
    device: torch.device,
    precision: str = "fp32",
    quantize: str = "none",
) -> tuple[GPTModel, str]:
    """A weights file's language model (a LoRA adapter file merged in, in memory), prepared for decoding
    (gptcore.inference.decoding.cast_for_inference), and the precision it decodes in (`auto` resolved).

    Raises:
        ConfigError: an unknown precision; ValueError: an unknown quantize (both before loading);
        GptcoreError: the file is a classifier; WeightsError: a file that cannot be loaded, or an adapter
            trained on another base.
    """
    resolved, reason = resolve_decoding_precision(precision, device)
    check_quantize(quantize)
    if adapter is None:
        from gptcore.weights import load_model

        model = load_model(path, device=device)
    else:
        from gptcore.recipes.merge import load_with_adapter

        model = load_with_adapter(path, adapter, device)[0]
    if model.config.num_classes is not None:
        raise GptcoreError(f"{path}: is a classifier; use `gptcore classify`")
    logger.debug("precision %s (%s)", resolved, reason)  # -v shows it
    return cast_for_inference(model, resolved, quantize), resolved


class LLM:
    """A language model prepared for decoding, with GPT-2's tokenizer.

    Every method takes the options of check_options as keywords: temperature (0, the default, is greedy),
    top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty,
    logit_bias ({token id: bias}), seed, max_new_tokens (50) and stop. A prompt is a text, continued as it
    is, or a list of OpenAI-style messages, rendered by the chat template.
    """

    def __init__(self, model: GPTModel, tokenizer=None, precision: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.precision = precision  # the resolved precision the model decodes in (its autocast, if mixed)
        self.device = model.tok_emb.weight.device

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        precision: str = "fp32",
        quantize: str = "none",
        device: str = "auto",
    ) -> LLM:
        """Load a weights file as `gptcore generate` and `gptcore serve` do (--adapter, --precision,
        --quantize, --device); raises as load_for_decoding."""
        from gptcore.device import resolve_device

        model, resolved = load_for_decoding(path, adapter, resolve_device(device), precision, quantize)
        return cls(model, get_tokenizer(), resolved)

    def __repr__(self) -> str:
        c = self.model.config
        return f"LLM({c.n_layers} layers x {c.emb_dim}, context {c.context_length}, {self.precision}, {self.device})"

    # -- text in, text out -----------------------------------------------------------------------------
    def generate(self, text: str, **options: Any) -> str:
        """The continuation of `text` (without it): the text of the tokens gptcore.generate appends."""
        if not isinstance(text, str):
            raise ValueError(f"generate: expected a text, got {type(text).__name__} (chat() takes messages)")
        return "".join(self.stream(text, **options))

    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """The assistant's reply to OpenAI-style messages (system, user, assistant, tool), rendered as
        `gptcore serve` renders them; the oldest turns are left out when the chat does not fit (fit_chat)."""
        return "".join(self.stream(chat_messages(messages), **options))

    def stream(self, prompt: str | Sequence[Mapping[str, Any]], **options: Any) -> Iterator[str]:
        """The reply to a text or to messages, piece by piece as it is decoded: whole characters only
        (a character split across tokens comes out once complete), text that may begin a stop string held
        back. Options are checked at the call; decoding starts at the first read, and stops (after the
        token being decoded) when the iterator is closed or dropped."""
        checked = check_options(options, self.model.config.vocab_size)
        if isinstance(prompt, str):
            ids = encode_text(self.tokenizer, prompt)
        else:
            messages, dropped = self.fit_chat(chat_messages(prompt), checked.max_new_tokens)
            if dropped:
                logger.warning("left out the oldest %d turn(s): the chat does not fit the context", dropped)
            ids = self.encode(messages)
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token")
        return self._pieces(ids, checked)

    # -- tokens ----------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
        """The token ids the model is given for a prompt: a text as it is (ordinary text: a typed
        `<|endoftext|>` is 7 tokens), messages through the chat template (the ids `gptcore serve` decodes
        from for the same messages)."""
        text = prompt if isinstance(prompt, str) else render_chat(chat_messages(prompt))
        return encode_text(self.tokenizer, text)

    def generate_ids(self, ids: Sequence[int], **options: Any) -> list[int]:
        """The new token ids after the prompt ids `ids` (end of text not included): the tokens
        gptcore.generate appends for the same options (no `stop`: that one works on text)."""
        checked = check_options(options, self.model.config.vocab_size, allowed=OPTIONS[:-1])
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token")
        return list(self._tokens(list(ids), checked))

    def fit_chat(self, messages: list[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list[dict], int]:
        """The messages the model can see with room for a reply: the oldest turns (a user message and what
        follows it up to the next user message; system messages stay) left out until the rendered chat
        leaves room for min(max_new_tokens, half the context) new tokens, as the server budgets a prompt
        (gptcore.serve.jobs.budget). The last turn always stays (if it alone is too long, decoding sees
        its last context-length tokens). Returns the messages kept and the number of turns left out."""
        context = self.model.config.context_length
        room, _ = budget(context, max_new_tokens, context)
        kept, dropped = list(messages), 0
        while len(self.encode(kept)) > room:
            turns = [i for i, m in enumerate(kept) if m["role"] == "user"]
            if len(turns) < 2:
                break
            first = next(i for i, m in enumerate(kept) if m["role"] != "system")
            kept = [m for i, m in enumerate(kept) if m["role"] == "system" or not first <= i < turns[1]]
            dropped += 1
        return kept, dropped

    def _pieces(self, ids: list[int], options: Options) -> Iterator[str]:
        detok = Detokenizer(self.tokenizer, list(options.stop))
        with contextlib.closing(self._tokens(ids, options)) as tokens:
            for token in tokens:
                piece = detok.push(token)
                if piece:
                    yield piece
                if detok.stopped:
                    return
        tail = detok.finish()
        if tail:
            yield tail

    def _tokens(self, ids: list[int], options: Options) -> Iterator[int]:
        """The new token ids as gptcore.generate samples them (end of text ends them, not included).

        generate runs on a worker thread and hands each token over through a queue; closing this iterator
        (or Ctrl-C while it waits) makes generate stop after its current token, and waits for that.
        """
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        end = object()

        def on_token(column: torch.Tensor) -> bool:  # column: [1, 1]
            tokens.put(int(column[0, 0]))
            return stop.is_set()

        def decode() -> None:
            try:
                idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, T]
                with autocast(self.device, self.precision):
                    generate(
                        self.model,
                        idx,
                        options.max_new_tokens,
                        eos_id=EOT_ID,
                        on_token=on_token,
                        sampling=options.sampling,
                    )
                tokens.put(end)
            except BaseException as err:  # noqa: BLE001 - handed to the reader, raised there
                tokens.put(err)

        worker = threading.Thread(target=decode, name="gptcore-llm", daemon=True)
        worker.start()
        try:
            while (item := tokens.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # a second Ctrl-C does not leave generate running beside the next call
                with contextlib.suppress(KeyboardInterrupt):
                    worker.join()
