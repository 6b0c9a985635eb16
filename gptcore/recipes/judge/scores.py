"""Reading the score that a judge's reply states, in one of the accepted forms (FORMS)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# The forms in which a reply states a score. Anything else (an explanation or a refusal that happens to
# hold one number, "The correct answer is 8.") states none: it is asked again, then recorded as failed.
FORMS = ("json", "bare", "labelled", "fraction", "out_of")
_NUM = r"[-+]?\d+(?:\.\d+)?"
_BARE = re.compile(rf"({_NUM})\.?")  # the whole reply: "85", "85."
_LABELLED = re.compile(  # "Score: 85", "score = 85", "Rating: 85", '"score": 85'; not "Score: 8/10"
    rf"\b(?:score|rating)\"?\s*[:=]\s*({_NUM})(?!\d|\s*(?:/|out\s+of)\s*(?!100\b)\d)", re.IGNORECASE
)
_FRACTION = re.compile(rf"(?<![\w./])({_NUM})\s*/\s*100(?![\w/]|\.\d)")  # "85/100"
_OUT_OF = re.compile(rf"(?<![\w./])({_NUM})\s+out\s+of\s+100(?![\w/]|\.\d)", re.IGNORECASE)  # "85 out of 100"
_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class ParsedScore:
    """A score read from a judge's reply, and the form that stated it (one of FORMS)."""

    value: int
    form: str


def parse_score(reply: str) -> ParsedScore:
    """The integer score 0-100 that a judge's reply states, and its form; ValueError (with the reason)
    if it states none.

    Accepted forms: the whole reply a bare integer, optionally with a full stop ("85", "85.", "**85**");
    a labelled score ("Score: 85", "score = 85", "Rating: 85"); "85/100"; "85 out of 100"; a JSON
    object with "score", the whole reply or in a ``` fenced block. Labelled, fraction and out-of forms
    may stand in text. A reply that states several different scores is rejected, not guessed; so are
    scores that are not integers or lie outside 0-100.
    """
    text = reply.strip()
    obj = _json_object(text)
    if obj is not None:
        return ParsedScore(_json_score(obj), "json")
    found: list[tuple[int, str, str]] = []  # (position, form, number)
    prose = text
    for block in _FENCED.finditer(text):
        obj = _json_object(block.group(1).strip())
        if obj is not None:
            found.append((block.start(), "json", str(_json_score(obj))))
            prose = prose[: block.start()] + " " * len(block.group(0)) + prose[block.end() :]
    prose = prose.replace("*", " ").replace("`", " ")  # Markdown emphasis and code marks
    bare = _BARE.fullmatch(prose.strip())
    if bare:  # all the prose is one number (beside a fenced JSON score, perhaps)
        found.append((len(prose) - len(prose.lstrip()), "bare", bare.group(1)))
    else:
        for form, pattern in (("labelled", _LABELLED), ("fraction", _FRACTION), ("out_of", _OUT_OF)):
            found += [(m.start(), form, m.group(1)) for m in pattern.finditer(prose)]
    if not found:
        raise ValueError("no score stated (a bare integer, Score: N, N/100, N out of 100 or JSON)")
    found.sort()
    numbers = {float(number) for _, _, number in found}
    if len(numbers) > 1:
        listed = ", ".join(dict.fromkeys(number for _, _, number in found))
        raise ValueError(f"several scores stated ({listed})")
    _, form, number = found[0]
    return ParsedScore(_check_score(number), form)


def _json_object(text: str) -> dict | None:
    """The JSON object with a "score" key that `text` is, or None."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and "score" in obj else None


def _json_score(obj: dict) -> int:
    value = obj["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"score is not a number: {value!r}")
    return _check_score(str(value).strip())


def _check_score(token: str) -> int:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"score is not a number: {token!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"score is not an integer: {token}")
    if not 0 <= value <= 100:
        raise ValueError(f"score out of range 0-100: {token}")
    return int(value)
