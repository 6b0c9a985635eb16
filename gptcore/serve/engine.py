"""The one worker thread that owns the model: continuous batching of generation requests, and embeddings.

Handlers submit work and receive events through a callback; they never touch the model, and nothing is
written to a socket while the model runs. Each decoding step feeds the last token of every active
request as one batch [B, 1] through a shared KV cache; a new request is prefilled alone (its prompt
but the last token) and joins the batch at the next step, and a finished or cancelled one leaves it
(vLLM's continuous batching, Ollama's parallel slots). Rows of different lengths share the cache by
left padding: `KVCache.pad_lengths` masks each row's padding and shifts its positions, so each request
sees exactly the positions it would see alone. Every request keeps its own sampling options and
generator; greedy fp32 decoding gives each the tokens it gets when it runs alone (measured token for
token, see docs/serving.md).

A request's prompt and new tokens fit in the context (Ollama's num_ctx rule): the prompt is cut from the
left, so no request ever recomputes a sliding window.

The job and event types are in serve/jobs.py, the embedding vector in serve/embedding.py, and the masks of
constrained (JSON) replies in serve/constraints.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from gptcore.inference.decoding import next_token_logits
from gptcore.inference.sampling import RowSampler
from gptcore.model import GPTModel, KVCache
from gptcore.serve.chat import Detokenizer
from gptcore.serve.constraints import allowed_tokens, close_reserve, closer_ids, closing_token, triggered
from gptcore.serve.embedding import embed_ids
from gptcore.serve.jobs import Done, Failed, Job, Piece, TokenLogprob
from gptcore.tokenizer import EOT_ID


class _Row:
    """An active request in the batch."""

    def __init__(self, job: Job, tokenizer, device: torch.device, matcher: Any, load_ns: int):
        self.job = job
        self.detok = Detokenizer(tokenizer, job.sampling.stop)
        self.new_ids: list[int] = []
        self.pending: list[TokenLogprob] = []  # log-probabilities whose token's text is not released yet
        self.logprobs: list[TokenLogprob] = []  # those released
        self.last = job.prompt[-1]
        self.tokens = list(job.prompt)  # the sequence so far: the penalties look back on it
        options = job.sampling.options
        if options.temperature > 0 and options.seed is None:
            options = options.replace(seed=int.from_bytes(os.urandom(8), "little") >> 1)
        self.sampler = RowSampler(options, device=device)
        self.matcher = matcher
        self.trigger = job.trigger if matcher is None and job.grammar is not None else None  # a lazy grammar
        self.load_ns = load_ns
        self.started = time.perf_counter()
        self.first_token_at: float | None = None


class Engine:
    """Owns the model (loaded by `load()`), serves jobs from a queue on one thread."""

    def __init__(
        self,
        load: Callable[[], GPTModel],
        tokenizer,
        max_batch: int = 16,
        compute: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        keep_alive: float = math.inf,
    ):
        self._load = load
        self.keep_alive = keep_alive  # seconds an idle model stays loaded when a request names none
        self.expires_at = math.inf  # wall-clock time (time.time()) at which the idle model is unloaded
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._compute = compute
        self.model: GPTModel | None = None
        self._queue: queue.Queue = queue.Queue()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._unload = False
        self._stopping = False
        self._grammar_tokenizer = None
        self._grammar_lock = threading.Lock()
        self._closers = closer_ids(tokenizer)
        self._thread = threading.Thread(target=self._run, name="gptcore-engine", daemon=True)

    # -- the handlers' side ----------------------------------------------------------------------------
    def start(self) -> None:
        self.ensure_loaded()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() run on the worker between decoding steps (it may use the model); blocks until it is done."""
        done = threading.Event()
        box: dict = {}
        self._queue.put(("call", fn, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def load(self, keep_alive: float | None = None) -> int:
        """Load the model on the worker if it is not loaded, to stay keep_alive seconds (None: the default)
        once idle; the nanoseconds the load took (0 if it was loaded)."""

        def work():
            load_ns = self.ensure_loaded()
            self.touch(keep_alive)
            return load_ns

        return self.call(work)

    def embed(
        self, prompts: list[list[int]], normalize: bool, dimensions: int | None = None, keep_alive: float | None = None
    ) -> tuple[list[list[float]], int]:
        """Sentence vectors of token id lists (see embed_ids), and the load time in nanoseconds."""

        def work():
            load_ns = self.ensure_loaded()
            vectors = [embed_ids(self.model, ids, normalize, dimensions) for ids in prompts]
            self.touch(keep_alive)
            return vectors, load_ns

        return self.call(work)

    def touch(self, keep_alive: float | None) -> None:
        """The model was used: it stays loaded keep_alive seconds from now (None: the default; 0: unload)."""
        seconds = self.keep_alive if keep_alive is None else keep_alive
        self.expires_at = time.time() + seconds
        if seconds == 0:
            self._unload = True

    def request_unload(self) -> None:
        """Drop the model once no request is running (Ollama's keep_alive 0); the next request reloads it."""
        self._unload = True
        self._queue.put(("wake",))

    @property
    def active(self) -> int:
        return len(self._rows)

    def grammar_tokenizer(self):
        """llguidance's view of the GPT-2 vocabulary (built once, ~1 s)."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._grammar_tokenizer = lltokenizer_from_encoding(self.tokenizer, eos_token=EOT_ID)
            return self._grammar_tokenizer

    def ensure_loaded(self) -> int:
        """Load the model if it is not; returns the nanoseconds that took (0 if it was loaded)."""
        if self.model is not None:
            return 0
        start = time.perf_counter()
        self.model = self._load()
        return int((time.perf_counter() - start) * 1e9)

    # -- the worker ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                with self._compute():  # the precision's autocast (a no-op for fp32 and bf16-true)
                    self._admit(block=not self._rows)
                    if self._rows:
                        self._step()
                idle = not self._rows and self._queue.empty()
                if idle and self.model is not None and (self._unload or time.time() >= self.expires_at):
                    self.model, self._cache, self._unload = None, None, False
            except Exception as err:  # noqa: BLE001 - fail the running requests, keep serving others
                message = " ".join(str(err).split()) or type(err).__name__
                for row in self._rows:
                    row.job.sink(Failed(f"generation failed: {message}"))
                self._rows, self._cache = [], None

    def _admit(self, block: bool) -> None:
        """Take queued work: calls (loads, embeddings) run at once, generation jobs join the batch."""
        while len(self._rows) < self.max_batch:
            try:
                item = self._queue.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, tuple):
                if item[0] == "call":
                    self._call(*item[1:])
                continue
            try:
                self._start(item)
            except Exception as err:  # noqa: BLE001 - this request fails, the batch goes on
                item.sink(Failed(f"generation failed: {' '.join(str(err).split()) or type(err).__name__}"))

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        load_ns = self.ensure_loaded()
        self._unload = False
        matcher = None
        if job.grammar is not None and job.trigger is None:
            matcher = self._matcher(job.grammar)
            if matcher.is_error():
                job.sink(Failed(f"format: {matcher.get_error()}"))
                return
        row = _Row(job, self.tokenizer, self.model.tok_emb.weight.device, matcher, load_ns)
        if job.max_new == 0:
            self._finish(row, "length")
            return
        self._join(row)

    def _matcher(self, grammar: str):
        from llguidance import LLMatcher

        return LLMatcher(self.grammar_tokenizer(), grammar, log_level=0)

    @torch.inference_mode()
    def _join(self, row: _Row) -> None:
        """Prefill row's prompt but its last token alone, and merge its cache into the batch's."""
        model, prompt = self.model, row.job.prompt[:-1]
        device = model.tok_emb.weight.device
        dtype = model.tok_emb.weight.dtype
        own = None
        if prompt:
            own = KVCache(
                model.config, 1, len(prompt), device=device, dtype=dtype, pad_lengths=torch.zeros(1, dtype=torch.long)
            )
            model.hidden_states(torch.tensor([prompt], device=device), own)  # fills the cache; no logits needed
        batch = self._cache
        old_len = batch.length if batch is not None else 0
        length = max(old_len, len(prompt))
        rows = len(self._rows) + 1
        capacity = min(model.config.context_length, max(64, 2 * (length + 1)))
        cache = KVCache(
            model.config, rows, capacity, device=device, dtype=dtype, pad_lengths=torch.zeros(rows, dtype=torch.long)
        )
        for tensor in cache.keys + cache.values:  # padding is masked, but 0 * NaN garbage would still be NaN
            tensor.zero_()
        pads = []
        if batch is not None:
            shift = length - old_len
            for layer in range(model.config.n_layers):
                cache.keys[layer][:-1, :, shift:length] = batch.keys[layer][:, :, :old_len]
                cache.values[layer][:-1, :, shift:length] = batch.values[layer][:, :, :old_len]
            pads = (batch.pad_lengths + shift).tolist()
        if own is not None:
            for layer in range(model.config.n_layers):
                cache.keys[layer][-1:, :, length - len(prompt) : length] = own.keys[layer][:, :, : len(prompt)]
                cache.values[layer][-1:, :, length - len(prompt) : length] = own.values[layer][:, :, : len(prompt)]
        pads.append(length - len(prompt))
        cache.pad_lengths = torch.tensor(pads, dtype=torch.long, device=device)
        cache.length = length
        self._cache = cache
        self._rows.append(row)

    @torch.inference_mode()
    def _step(self) -> None:
        """One new token for every active row."""
        self._make_room()
        device = self.model.tok_emb.weight.device
        last = torch.tensor([[row.last] for row in self._rows], device=device)  # [B, 1]
        logits = next_token_logits(self.model, last, self._cache)  # [B, V], fp32 logits
        keep = []
        now = time.perf_counter()
        for b, row in enumerate(self._rows):
            if row.job.cancelled.is_set():
                continue
            if row.first_token_at is None:
                row.first_token_at = now
            token = self._sample(row, logits[b : b + 1])
            if row.job.logprobs is not None and token != EOT_ID:
                row.pending.append(self._logprob(logits[b], token, row.job.logprobs, len(row.detok.text)))
            reason = self._advance(row, token)
            if reason is None:
                keep.append(b)
            else:
                self._finish(row, reason)
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        if row.matcher is None:
            return row.sampler.sample(logits[0], row.tokens)
        allowed = allowed_tokens(row.matcher, logits.shape[-1], logits.device)
        if row.matcher.is_error() or not bool(allowed.any()):  # nothing may follow: end the reply here
            return EOT_ID
        logits = logits.masked_fill(~allowed, float("-inf"))
        if len(row.new_ids) >= row.job.max_new - close_reserve(row.job.max_new):
            return closing_token(self._closers, allowed, logits)
        return row.sampler.sample(logits[0], row.tokens)

    def _logprob(self, logits: torch.Tensor, token: int, top: int, offset: int) -> TokenLogprob:
        """token's log-probability under logits [V] and the `top` most likely tokens'."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # [V]

        def entry(t: int, value: float, at: int) -> TokenLogprob:
            raw = self.tokenizer.decode_single_token_bytes(t)
            return TokenLogprob(raw.decode("utf-8", errors="replace"), raw, value, at)

        chosen = entry(token, float(logp[token]), offset)
        if top > 0:
            values, ids = torch.topk(logp, min(top, logp.shape[-1]))
            chosen.top = [entry(int(t), float(v), offset) for v, t in zip(values.tolist(), ids.tolist())]
        return chosen

    def _release_logprobs(self, row: _Row, final: bool) -> list[TokenLogprob]:
        """The pending log-probabilities of tokens whose text has begun to be released (at the end: of every
        token whose text was not cut off by a stop string)."""
        if final:
            limit = len(row.detok.text) if row.detok.stopped else None
            ready = [t for t in row.pending if limit is None or t.offset < limit]
            row.pending = []
        else:
            ready = [t for t in row.pending if t.offset < row.detok.sent]
            row.pending = row.pending[len(ready) :]
        row.logprobs += ready
        return ready

    def _advance(self, row: _Row, token: int) -> str | None:
        """Record a sampled token; the reason the row is finished, or None."""
        if row.matcher is not None:
            row.matcher.consume_token(token)
        if token == EOT_ID:
            return "stop"
        row.new_ids.append(token)
        row.tokens.append(token)
        row.last = token
        piece = row.detok.push(token)
        if piece:
            row.job.sink(Piece(piece, self._release_logprobs(row, final=False)))
        if row.trigger is not None:  # a lazy grammar starts once the reply begins with its trigger
            rest = triggered(row.detok.text, row.trigger)
            if rest is not None:
                row.trigger = None
                if rest is not False:
                    row.matcher = self._matcher(row.job.grammar)
                    row.matcher.consume_tokens(self.tokenizer.encode_ordinary(rest))
        if row.detok.stopped or (row.matcher is not None and row.matcher.is_stopped()):
            return "stop"
        if len(row.new_ids) >= row.job.max_new:
            if row.matcher is not None and not row.matcher.is_accepting():
                context = self.model.config.context_length
                if len(row.job.prompt) + len(row.new_ids) < context:
                    return None  # a constrained reply closes its value within the context
            return "length"
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        self.touch(row.job.keep_alive)
        if row.job.unload_after:
            self._unload = True
        tail = row.detok.finish()
        logprobs = self._release_logprobs(row, final=True)
        if tail or logprobs:
            row.job.sink(Piece(tail, logprobs))
        end = time.perf_counter()
        first = row.first_token_at or end
        row.job.sink(
            Done(
                reason=reason,
                text=row.detok.text,
                prompt_ids=row.job.prompt,
                new_ids=row.new_ids,
                logprobs=row.logprobs if row.job.logprobs is not None else None,
                load_duration=row.load_ns,
                prompt_eval_duration=_ns(first - row.started),
                eval_duration=_ns(end - first),
                total_duration=_ns(end - row.job.submitted),
            )
        )

    def _keep(self, keep: list[int]) -> None:
        """Drop finished rows from the batch and the cache; drop padding every row has in common."""
        self._rows = [self._rows[b] for b in keep]
        if not keep:
            self._cache = None
            return
        cache = self._cache
        rows = torch.tensor(keep, device=cache.pad_lengths.device)
        cache.keys = [k[rows] for k in cache.keys]
        cache.values = [v[rows] for v in cache.values]
        cache.pad_lengths = cache.pad_lengths[rows]
        self._compact()

    def _compact(self) -> None:
        """Shift the cache left by the padding all rows share, so that its length is the longest row's."""
        cache = self._cache
        common = int(cache.pad_lengths.min())
        if common == 0:
            return
        n = cache.length - common
        cache.keys = [k[:, :, common:].clone() if n else k for k in cache.keys]
        cache.values = [v[:, :, common:].clone() if n else v for v in cache.values]
        cache.pad_lengths = cache.pad_lengths - common
        cache.length = n
        cache.max_len = cache.keys[0].shape[2]

    def _make_room(self) -> None:
        """Room for one more position: grow the cache (up to the context); every row fits by budget()."""
        cache = self._cache
        if cache.length + 1 <= cache.max_len:
            return
        self._compact()
        if cache.length + 1 <= cache.max_len:
            return
        context = self.model.config.context_length
        size = min(context, 2 * cache.max_len)

        def grow(t: torch.Tensor) -> torch.Tensor:
            """t [B, H, max_len, D] zero-padded to [B, H, size, D]."""
            return torch.cat([t, t.new_zeros(*t.shape[:2], size - t.shape[2], t.shape[3])], dim=2)

        cache.keys = [grow(k) for k in cache.keys]
        cache.values = [grow(v) for v in cache.values]
        cache.max_len = size

    @staticmethod
    def _call(fn: Callable[[], Any], box: dict, done: threading.Event) -> None:
        try:
            with torch.inference_mode():
                box["value"] = fn()
        except Exception as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err
        finally:
            done.set()


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
