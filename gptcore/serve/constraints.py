"""Constrained (JSON) decoding on the engine's worker: the tokens a job's llguidance matcher allows next,
how a reply near the end of its token budget closes its value, and when a lazy grammar starts (a reply
that begins with its trigger: llama.cpp's lazy grammars with trigger words)."""

from __future__ import annotations

import torch

# Tokens a constrained (JSON) reply prefers once it must close: a string's end, then the structures'.
CLOSERS = ('"', "}", "]", "0", "null")


def closer_ids(tokenizer) -> list[int]:
    """The ids of the CLOSERS that are one token each, in CLOSERS' order."""
    return [ids[0] for ids in (tokenizer.encode_ordinary(t) for t in CLOSERS) if len(ids) == 1]


def close_reserve(max_new: int) -> int:
    """How many tokens before the end of its budget a constrained reply starts to close its value."""
    return min(32, max_new // 2)


def closing_token(closers: list[int], allowed: torch.Tensor, logits: torch.Tensor) -> int:
    """Near the end of its budget, a constrained reply takes the first allowed closer, else its best
    allowed token: the shortest way we know to a value that parses."""
    for token in closers:
        if bool(allowed[0, token]):
            return token
    return int(logits.argmax(dim=-1)[0])


def allowed_tokens(matcher, vocab: int, device: torch.device) -> torch.Tensor:
    """The matcher's bitmask as a boolean row [1, V]."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab].astype(bool)).to(device)[None, :]


def triggered(text: str, trigger: str) -> str | bool | None:
    """Where a lazy grammar stands after a reply's text so far: None while the text (leading whitespace
    aside) may still become the trigger, False once it cannot (the reply stays free), else the text after
    the trigger, which the grammar must accept next."""
    head = text.lstrip()
    if head.startswith(trigger):
        return head[len(trigger) :]
    if trigger.startswith(head):
        return None
    return False
