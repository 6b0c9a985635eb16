"""Direct Preference Optimization (Rafailov et al. 2023), from scratch: response log-probabilities,
the loss, and the rewards it implies.

loss = -log sigmoid(beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))]) per pair, with
log pi(y) the log-probability of response y given its prompt, summed over the response's tokens (or
their mean, as the book's ch. 7 notebook), prompt and padding masked out. The reference's values are
computed once beforehand (TRL's `precompute_ref_log_probs`), so the policy is the only model in memory.
The rewards are beta * (log pi(y) - log pi_ref(y)); a pair is ranked right when the chosen reward
exceeds the rejected one. `nll_weight` adds the chosen responses' mean token NLL (TRL's `rpo_alpha`,
Pang et al. 2024), which keeps their likelihood from falling while the margin grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptcore.precision import autocast
from gptcore.training.cross_entropy import IGNORE_INDEX, cross_entropy
from gptcore.training.evaluation import to_device

LN2 = math.log(2.0)  # the loss when policy = reference


def sequence_logprobs(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the counted targets of each sequence, and their number.

    inputs, targets: [..., T] (targets -100 where not counted). Returns (sums [...], counts [...]), fp32.
    Each sequence's logits go through gptcore's cross_entropy (fp32 arithmetic, no fp32 copy of bf16
    logits); a sequence's sum is minus its mean cross-entropy times its count.
    """
    shape = inputs.shape[:-1]
    flat_inputs, flat_targets = inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1, targets.shape[-1])
    logits = model(flat_inputs)  # [N, T, V]
    counts = (flat_targets != IGNORE_INDEX).sum(dim=-1)  # [N]
    sums = torch.stack(
        [-cross_entropy(logits[i], flat_targets[i], IGNORE_INDEX) * counts[i] for i in range(logits.shape[0])]
    )  # [N]
    return sums.float().reshape(shape), counts.reshape(shape)


@dataclass
class PairScores:
    """Per pair [B]: the DPO loss, the chosen and rejected rewards, and the policy's mean token log-prob
    of the chosen response (the likelihood the NLL term guards)."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    chosen_logprob: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss per pair from log-probs [B, 2] (chosen, rejected) of policy and reference.

    Returns (loss [B], chosen reward [B], rejected reward [B]); the rewards carry no gradient.
    """
    ratios = policy - reference  # [B, 2]: log pi(y) - log pi_ref(y)
    logits = beta * (ratios[:, 0] - ratios[:, 1])  # [B]
    loss = -F.logsigmoid(logits)  # log(1 + exp(-x)), stable for large |x|
    rewards = (beta * ratios).detach()
    return loss, rewards[:, 0], rewards[:, 1]


class DpoObjective:
    """The training loop's loss_fn: DPO's mean loss over a batch's pairs (+ nll_weight x chosen NLL).

    A batch is (inputs [B, 2, T], targets [B, 2, T], reference sums [B, 2]) from
    gptcore.data.preferences.collate_preferences. `mean_over = "rows"` tells the step runner the loss
    is a mean over pairs, so micro-batches and processes are weighted by their pairs.
    """

    mean_over = "rows"

    def __init__(self, beta: float, nll_weight: float = 0.0, logprob: str = "mean"):
        if logprob not in ("mean", "sum"):
            raise ValueError(f"logprob: expected mean or sum, got {logprob!r}")
        self.beta, self.nll_weight, self.logprob = beta, nll_weight, logprob

    def scores(self, model: nn.Module, batch) -> PairScores:
        """Loss, rewards and chosen log-likelihood per pair of the batch."""
        inputs, targets, reference_sums = batch
        sums, counts = sequence_logprobs(model, inputs, targets)  # [B, 2] each
        counts = counts.clamp(min=1).float()
        policy = sums / counts if self.logprob == "mean" else sums
        reference = reference_sums / counts if self.logprob == "mean" else reference_sums
        loss, chosen, rejected = dpo_loss(policy, reference.to(policy.device), self.beta)
        return PairScores(loss, chosen, rejected, sums[:, 0] / counts[:, 0])

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        scores = self.scores(model, batch)
        loss = scores.loss.mean()
        if self.nll_weight:
            loss = loss - self.nll_weight * scores.chosen_logprob.mean()
        return loss


@torch.no_grad()
def evaluate_pairs(objective: DpoObjective, model: nn.Module, batches, device, precision: str) -> dict[str, float]:
    """Means over the pairs of `batches` (in eval mode): loss, rewards, margin, reward accuracy (share of
    pairs with margin > 0) and the chosen responses' mean token log-prob."""
    was_training = model.training
    model.eval()
    parts: list[PairScores] = []
    try:
        for batch in batches:
            with autocast(device, precision):
                parts.append(objective.scores(model, to_device(batch, device)))
    finally:
        model.train(was_training)
    if not parts:
        nan = float("nan")
        return dict.fromkeys(("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "chosen_logprob"), nan)
    joined = PairScores(*(torch.cat([getattr(p, f) for p in parts]).float() for f in PairScores.__dataclass_fields__))
    return {
        "loss": joined.loss.mean().item(),
        "chosen_reward": joined.chosen_reward.mean().item(),
        "rejected_reward": joined.rejected_reward.mean().item(),
        "margin": joined.margin.mean().item(),
        "accuracy": (joined.margin > 0).float().mean().item(),
        "chosen_logprob": joined.chosen_logprob.mean().item(),
    }
