"""How long to wait before asking a server again: exponential backoff, or longer if the server says so."""

from __future__ import annotations

import email.utils
import time

# A server may ask for any wait in Retry-After; past this many seconds we retry anyway.
MAX_RETRY_AFTER = 300.0


def retry_delay(attempt: int, backoff: float, retry_after: str | None = None, now: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (0-based): backoff * 2**attempt, or the
    wait the server's Retry-After header asks for (delay-seconds or an HTTP date) when that is longer,
    capped at MAX_RETRY_AFTER."""
    delay = backoff * 2**attempt
    asked = parse_retry_after(retry_after, now)
    return delay if asked is None else max(delay, min(asked, MAX_RETRY_AFTER))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110: delay-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322's "UTC, origin unknown"
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
