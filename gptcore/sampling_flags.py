"""The command line's sampling flags (`gptcore generate`, `gptcore chat`): --max-new-tokens, --temperature,
--top-k, one table of the sampler's other options, --logit-bias and --seed; their argparse options, and the
SamplingOptions they make. Kept apart from gptcore/cli.py, which knows every verb; imports no torch until
options are made."""

from __future__ import annotations

import argparse

from gptcore.arguments import non_negative_int, non_negative_number, positive_int, seed_number
from gptcore.errors import GptcoreError

# The sampler's options beside --temperature, --top-k and --seed (gptcore/inference/sampling.py: their order).
SAMPLING_FLAGS = (
    ("top_p", float, 1.0, "keep the most likely tokens up to this probability mass (nucleus); 1: off"),
    ("min_p", float, 0.0, "keep tokens at least this fraction as likely as the most likely one; 0: off"),
    ("typical_p", float, 1.0, "locally typical sampling: keep the most typical tokens up to this mass; 1: off"),
    ("repeat_penalty", float, 1.0, "divide the logits of tokens seen in the last --repeat-last-n tokens; 1: off"),
    ("repeat_last_n", int, 64, "tokens the penalties look back on (prompt included); 0: off, -1: all"),
    ("presence_penalty", float, 0.0, "subtract from the logit of every token seen in that window"),
    ("frequency_penalty", float, 0.0, "subtract this times its count from the logit of every token seen there"),
)


def sampling_from_flags(args: argparse.Namespace):
    """The sampler's options from the flags, or a GptcoreError naming the bad one."""
    from gptcore.inference.sampling import SamplingOptions

    bias = {}
    for item in args.logit_bias or []:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise GptcoreError(f"--logit-bias: expected TOKEN_ID=BIAS (e.g. 198=-100), got {item!r}") from None
    try:
        return SamplingOptions(
            temperature=args.temperature,
            top_k=args.top_k,
            logit_bias=bias,
            **{name: getattr(args, name) for name, *_ in SAMPLING_FLAGS},
        )
    except ValueError as err:
        raise GptcoreError(f"--{str(err).replace('_', '-')}") from None


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 50, what: str = "") -> None:
    """The sampling flags of `gptcore generate` (and any verb that samples): --max-new-tokens (its default
    given; `what` says what the tokens make, in its help), --temperature, --top-k, the table above,
    --logit-bias, --seed."""
    p.add_argument(
        "--max-new-tokens",
        type=non_negative_int,
        default=max_new_tokens,
        help=f"tokens to generate at most{what} (fewer if the model emits end-of-text)",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_number,
        default=0.0,
        help="sampling temperature, a finite number >= 0; 0 is greedy (argmax)",
    )
    p.add_argument("--top-k", type=positive_int, default=None, help="keep only the k most likely tokens; unset: all")
    for name, kind, default, text in SAMPLING_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    p.add_argument(
        "--logit-bias",
        action="append",
        metavar="TOKEN_ID=BIAS",
        help="add BIAS to a token's logit (repeatable; -100 bans it, +100 forces it)",
    )
    p.add_argument(
        "--seed",
        type=seed_number,
        default=None,
        help="seed of the sampling generator, for repeatable samples; unset: a fresh draw each run",
    )
