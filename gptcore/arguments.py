"""argparse helpers shared by `gptcore VERB` and the stage scripts: help that shows defaults, and number
types that refuse out-of-range values with argparse's usage and one error line (exit 2).

Kept free of torch: every stage script imports it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (not for required options nor unset defaults), and
    keeps descriptions as written (stage docstrings are paragraphs)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subparsers (same class) inherit the formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within [minimum, maximum] (either bound optional).

    Raises:
        argparse.ArgumentTypeError: text that is not an integer or is out of range (argparse exits 2).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_range(minimum, maximum)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number >= minimum (when given).

    Raises:
        argparse.ArgumentTypeError: text that is not a number, is nan or infinite, or is below minimum.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, cuda, cuda:N or mps (whether it is usable is checked when it is used).

    Raises:
        argparse.ArgumentTypeError: any other name.
    """
    from gptcore.params.choices import is_device_name  # the rule params.yaml's `device` follows

    if is_device_name(text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in {minimum}..{maximum}"
    return f">= {minimum}" if minimum is not None else f"<= {maximum}"


# The CLI's bounds, named once (tokens, counts, a TCP port, a torch seed).
non_negative_int = integer(minimum=0)
positive_int = integer(minimum=1)
port_number = integer(0, 65535)  # 0: the system picks a free port
seed_number = integer(0, 2**64 - 1)  # torch.Generator.manual_seed's range
non_negative_number = number(minimum=0.0)
