"""Reading the verdict that a pairwise judge's reply states: "1", "2" or "tie", in one of FORMS."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

VERDICTS = ("1", "2", "tie")
# The forms in which a reply states a verdict. Anything else ("Response 1 is good, but 2 ...") states
# none: it is asked again, then recorded as failed.
FORMS = ("json", "bracketed", "bare")
_BRACKETED = re.compile(r"\[\[\s*(1|2|tie)\s*\]\]", re.IGNORECASE)  # MT-Bench's [[A]] / [[B]] / [[C]], ours numbered
_BARE = re.compile(r"(?:response\s+)?(1|2|tie)\.?", re.IGNORECASE)  # the whole reply: "1", "Response 2.", "tie"
# Ollama's structured outputs: the reply constrained to {"verdict": "1" | "2" | "tie"}.
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": list(VERDICTS)}},
    "required": ["verdict"],
}


@dataclass(frozen=True)
class ParsedVerdict:
    """A verdict read from a reply ("1", "2" or "tie") and the form that stated it (one of FORMS)."""

    value: str
    form: str


def parse_verdict(reply: str) -> ParsedVerdict:
    """The verdict a pairwise judge's reply states, and its form; ValueError (with the reason) if none.

    Accepted: a JSON object {"verdict": "1" | "2" | "tie"} (the whole reply); "[[1]]", "[[2]]" or
    "[[tie]]" standing anywhere in the text (MT-Bench's form); the whole reply "1", "2", "tie" or
    "Response 1" (a full stop and Markdown emphasis allowed). A reply that states two different
    verdicts is rejected, not guessed.
    """
    text = reply.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "verdict" in obj:
        value = str(obj["verdict"]).strip().lower()
        if value not in VERDICTS:
            raise ValueError(f"verdict is not 1, 2 or tie: {obj['verdict']!r}")
        return ParsedVerdict(value, "json")
    found = {m.group(1).lower() for m in _BRACKETED.finditer(text)}
    if len(found) > 1:
        raise ValueError(f"several verdicts stated ({', '.join(sorted(found))})")
    if found:
        return ParsedVerdict(found.pop(), "bracketed")
    bare = _BARE.fullmatch(text.replace("*", "").replace("`", "").strip())
    if bare:
        return ParsedVerdict(bare.group(1).lower(), "bare")
    raise ValueError('no verdict stated ("[[1]]", "[[2]]", "[[tie]]", a bare 1/2/tie, or JSON)')
