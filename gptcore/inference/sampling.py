"""The sampler: every decoding option as one small step on one row's logits, applied as a chain.

The order is llama.cpp's (`common/sampling.cpp`: the logit-bias sampler first, then the default chain
`penalties; dry; top_n_sigma; top_k; typ_p; top_p; min_p; xtc; temperature`, then `dist`), without the
steps gptcore does not offer (DRY, top-n-sigma, XTC):

    1. logit bias          add each listed token's bias to its logit
    2. penalties           over the last `repeat_last_n` tokens of the sequence (prompt included, as
                           llama.cpp's server feeds it): a logit of a token seen there is divided by
                           `repeat_penalty` (multiplied, if negative), then lowered by
                           count x frequency_penalty + presence_penalty
    3. top-k               keep the k highest logits (and any tied with the k-th)
    4. typical-p           keep the tokens whose surprise is closest to the entropy, up to mass p
                           (Meister et al. 2022, arXiv:2202.00666)
    5. top-p               keep the most likely tokens up to mass p (nucleus; Holtzman et al. 2019)
    6. min-p               keep the tokens at least min_p times as likely as the most likely one
    7. temperature         divide the logits; 0 keeps only the highest remaining logit (greedy)
    8. draw                one token from the softmax, with the row's own seeded generator

Steps 4-6 measure probabilities over what the earlier steps kept (softmax of the surviving logits), as
llama.cpp's candidates list does; a removed token's logit becomes -inf. Every step keeps at least one
token. Options are checked once, when a SamplingOptions is made (vLLM's SamplingParams), each error
naming its option. Each row of a batch has its own RowSampler: its options, its generator and its
history, so a row samples the same tokens whatever else is decoded beside it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch

ORDER = ("logit_bias", "penalties", "top_k", "typical_p", "top_p", "min_p", "temperature", "draw")


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen (see the module docstring for each option and their order).

    The neutral value of each option leaves the logits as they are; temperature 0 is greedy.
    """

    temperature: float = 0.0
    top_k: int | None = None  # None: every token
    top_p: float = 1.0  # [0, 1]; 0 keeps only the most likely token
    min_p: float = 0.0  # [0, 1]
    typical_p: float = 1.0  # [0, 1]; 0 keeps only the most typical token
    repeat_penalty: float = 1.0  # > 0; 1: off
    repeat_last_n: int = 64  # tokens the penalties look back on; 0: off, -1: the whole sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # None: the caller's generator (or torch's global one)

    def __post_init__(self):
        check_options(self)

    def replace(self, **changes) -> SamplingOptions:
        """A copy with some options changed (checked again)."""
        return SamplingOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @property
    def penalizes(self) -> bool:
        """True when the penalties step changes anything (it then needs the sequence's tokens)."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


def _number(name: str, value, low: float | None = None, high: float | None = None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def check_options(o: SamplingOptions) -> None:
    """ValueError naming the first option that cannot be sampled with."""
    if isinstance(o.temperature, bool) or not isinstance(o.temperature, (int, float)):
        raise ValueError(f"temperature must be a finite number >= 0, got {o.temperature!r}")
    if not math.isfinite(o.temperature) or o.temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {o.temperature}")
    if o.top_k is not None and (isinstance(o.top_k, bool) or not isinstance(o.top_k, int) or o.top_k < 1):
        raise ValueError(f"top_k must be positive, got {o.top_k}")
    _number("top_p", o.top_p, 0.0, 1.0)
    _number("min_p", o.min_p, 0.0, 1.0)
    _number("typical_p", o.typical_p, 0.0, 1.0)
    _number("repeat_penalty", o.repeat_penalty, 0.0, open_low=True)
    if isinstance(o.repeat_last_n, bool) or not isinstance(o.repeat_last_n, int) or o.repeat_last_n < -1:
        raise ValueError(f"repeat_last_n must be -1 (the whole sequence), 0 (off) or more, got {o.repeat_last_n}")
    _number("presence_penalty", o.presence_penalty)
    _number("frequency_penalty", o.frequency_penalty)
    for token, bias in o.logit_bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias: token ids are integers >= 0, got {token!r}")
        _number(f"logit_bias[{token}]", bias)
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int)):
        raise ValueError(f"seed must be an integer, got {o.seed!r}")


# -- the steps, each on one row of fp32 logits [V] (in place where it changes them) -------------------------
def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> None:
    if not bias:
        return
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    if int(ids.max()) >= logits.shape[-1]:
        raise ValueError(f"logit_bias: token id {int(ids.max())} is outside the vocabulary ({logits.shape[-1]})")
    logits.index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))


def apply_penalties(logits: torch.Tensor, history: Sequence[int], o: SamplingOptions) -> None:
    window = history if o.repeat_last_n == -1 else history[len(history) - min(o.repeat_last_n, len(history)) :]
    counts = Counter(window)
    if not counts:
        return
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    seen = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    chosen = logits[ids]
    chosen = torch.where(chosen <= 0, chosen * o.repeat_penalty, chosen / o.repeat_penalty)
    logits[ids] = chosen - (seen * o.frequency_penalty + o.presence_penalty)


def keep_top_k(logits: torch.Tensor, k: int) -> None:
    if k < logits.shape[-1]:
        kth = torch.topk(logits, k).values[-1]
        logits.masked_fill_(logits < kth, float("-inf"))


def _drop_after(logits: torch.Tensor, order: torch.Tensor, cumulative: torch.Tensor, p: float, strict: bool) -> None:
    """Keep order[: i + 1] for the first i whose cumulative mass reaches p (> p if strict); drop the rest."""
    reached = cumulative > p if strict else cumulative >= p
    last = int(reached.int().argmax()) if bool(reached.any()) else order.shape[0] - 1
    logits[order[last + 1 :]] = float("-inf")


def keep_typical(logits: torch.Tensor, p: float) -> None:
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp.masked_fill(probs == 0, 0.0)).sum()
    surprise = (-logp - entropy).abs()  # inf for removed tokens: they sort last
    order = torch.sort(surprise, stable=True).indices
    _drop_after(logits, order, probs[order].cumsum(0), p, strict=True)


def keep_top_p(logits: torch.Tensor, p: float) -> None:
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True, stable=True)
    _drop_after(logits, order, probs.cumsum(0), p, strict=False)


def keep_min_p(logits: torch.Tensor, p: float) -> None:
    logits.masked_fill_(logits < logits.max() + math.log(p), float("-inf"))


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Temperature and the draw: the argmax at 0, else one token from softmax(logits / temperature)."""
    if temperature == 0.0:
        return int(logits.argmax())
    # A temperature beyond float32's range would be inf in the division, and -inf / inf is NaN.
    scaled = logits / min(temperature, torch.finfo(torch.float32).max)
    if bool((torch.isinf(scaled) & torch.isfinite(logits)).any()):
        # A tiny temperature overflows logits to +-inf (softmax then gives NaN); measured from the row's
        # maximum they stay finite at the top (0), which keeps the mass on the best tokens as T -> 0 does.
        scaled = (logits - logits.max()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs[None], num_samples=1, generator=generator)[0, 0])


def process(logits: torch.Tensor, options: SamplingOptions, history: Sequence[int] = ()) -> torch.Tensor:
    """Steps 1-6 on a copy of one row's logits [V] (fp32): what the draw chooses from."""
    logits = logits.float().clone()
    apply_logit_bias(logits, options.logit_bias)
    if options.penalizes:
        apply_penalties(logits, history, options)
    if options.top_k is not None:
        keep_top_k(logits, options.top_k)
    if options.typical_p < 1.0:
        keep_typical(logits, options.typical_p)
    if options.top_p < 1.0:
        keep_top_p(logits, options.top_p)
    if options.min_p > 0.0:
        keep_min_p(logits, options.min_p)
    return logits


class RowSampler:
    """One row's sampler: its options and its generator (seeded by options.seed, else the one given)."""

    def __init__(
        self, options: SamplingOptions, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ):
        self.options = options
        if options.seed is not None:
            generator = torch.Generator(device=device).manual_seed(options.seed % 2**63)
        self.generator = generator

    def sample(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """The next token from one row's logits [V], `history` the sequence's tokens so far (for penalties)."""
        return draw(process(logits, self.options, history), self.options.temperature, self.generator)
