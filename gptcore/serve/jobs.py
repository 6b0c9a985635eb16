"""What the handlers and the engine exchange: a generation job, its sampling options and token budget,
and the events the engine sends back for it (text pieces with their log-probabilities, then Done or Failed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gptcore.inference.sampling import SamplingOptions


@dataclass
class Sampling:
    """A request's sampling options (checked when made) and its stop strings."""

    options: SamplingOptions = field(default_factory=SamplingOptions)
    stop: list[str] = field(default_factory=list)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before
    temperature, top-k and format masks, as Ollama reports them) and the most likely alternatives."""

    token: str  # its text ("\ufffd" where it holds part of a UTF-8 character; `raw` has the bytes)
    raw: bytes
    logprob: float
    offset: int  # where its text starts in the reply (characters)
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Piece:
    """Text released by the detokenizer (may be empty when a token only completes part of a character),
    and, for a job that asked for them, the log-probabilities of the tokens whose text it begins."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Done:
    reason: str  # "stop" (end of text, a stop string, a complete JSON value) or "length"
    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    logprobs: list[TokenLogprob] | None  # every token's, for a job that asked for them
    load_duration: int  # nanoseconds
    prompt_eval_duration: int
    eval_duration: int
    total_duration: int


@dataclass
class Failed:
    message: str


Event = Piece | Done | Failed


def budget(prompt_len: int, num_predict: int | None, context: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens allowed): prompt + new tokens fit in the context.

    num_predict None or < 0 is unbounded (until end of text or a full context). A prompt that leaves too
    little room keeps its last tokens: all but the num_predict tokens asked for, at most half the context.
    """
    want = context if num_predict is None or num_predict < 0 else num_predict
    keep = min(prompt_len, context - min(want, context // 2))
    return keep, min(want, context - keep)


class Job:
    """One generation request as the worker sees it; `cancel()` may be called from any thread."""

    def __init__(
        self,
        prompt: list[int],
        max_new: int,
        sampling: Sampling,
        sink: Callable[[Event], None],
        grammar: str | None = None,
        unload_after: bool = False,
        logprobs: int | None = None,
        keep_alive: float | None = None,
        trigger: str | None = None,
    ):
        self.prompt = prompt
        self.trigger = trigger  # with a grammar: it applies only once the reply begins with this text
        self.keep_alive = keep_alive  # seconds the model stays loaded after this job (inf: forever); None: default
        self.logprobs = logprobs  # None: none; k >= 0: each token's log-probability and its k best alternatives
        self.unload_after = unload_after or keep_alive == 0  # Ollama's keep_alive 0: drop the model once idle
        self.max_new = max_new
        self.sampling = sampling
        self.sink = sink
        self.grammar = grammar
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()
