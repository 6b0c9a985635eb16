"""A request's trip through the engine, seen from the event loop: its job submitted within the token
budget, and the events the engine's thread sends back delivered into the loop (a client that goes away
cancels the job)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request

from gptcore.serve import protocol as p
from gptcore.serve.engine import Engine
from gptcore.serve.info import ServerInfo
from gptcore.serve.jobs import Done, Failed, Job, Sampling, budget


@dataclass(frozen=True)
class Budget:
    """A request's token budget: new tokens (None or < 0: until end of text or a full context), the context
    (None: the model's; a larger one is the model's), and prompt tokens kept from its start when it is cut."""

    num_predict: int | None = None
    num_ctx: int | None = None
    num_keep: int = 0


def submit(
    engine: Engine,
    info: ServerInfo,
    ids: list[int],
    sampling: Sampling,
    limit: Budget,
    grammar: str | None,
    keep_alive: float | None = None,
    logprobs: int | None = None,
    trigger: str | None = None,
) -> Events:
    """Queue a job for ids within the budget; its events arrive through the returned Events."""
    num_predict = limit.num_predict
    if info.max_predict is not None and (num_predict is None or num_predict < 0 or num_predict > info.max_predict):
        num_predict = info.max_predict
    context = info.context_length if not limit.num_ctx else min(limit.num_ctx, info.context_length)
    keep, max_new = budget(len(ids), num_predict, context)
    head = min(limit.num_keep, keep // 2) if keep < len(ids) else 0  # Ollama's num_keep, within half the room
    prompt = ids[:head] + ids[len(ids) - keep + head :]
    events = Events(asyncio.get_running_loop())
    events.job = Job(
        prompt, max_new, sampling, events.put, grammar, logprobs=logprobs, keep_alive=keep_alive, trigger=trigger
    )
    engine.submit(events.job)
    return events


class Events:
    """The engine's events for one job, delivered into the event loop; closing it cancels the job."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None

    def put(self, event) -> None:  # called on the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.job.cancel()

    async def __aiter__(self):
        try:
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            self.job.cancel()


async def wait_done(request: Request, events: Events) -> Done:
    """The Done event of a non-streaming request; a client that goes away (checked every half second,
    whether or not tokens keep coming) cancels the job."""
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise p.RequestError(500, event.message)
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise p.RequestError(499, "client closed the request")
    finally:
        events.job.cancel()
