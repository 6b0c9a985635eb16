"""Sentence embeddings: the vector of one token id list, computed on the engine's worker (serve/engine.py)."""

from __future__ import annotations

import torch

from gptcore.model import GPTModel


@torch.inference_mode()
def embed_ids(model: GPTModel, ids: list[int], normalize: bool = True, dimensions: int | None = None) -> list[float]:
    """A sentence vector: the mean of the final hidden states (after the last LayerNorm) over the tokens,
    L2-normalised when `normalize` (as Ollama's /api/embed returns them). `dimensions` keeps only the first
    components (then normalised), as Ollama's `dimensions` does for any model; None or more than the
    width keeps them all."""
    device = model.tok_emb.weight.device
    idx = torch.tensor([ids], device=device)  # [1, T]
    x = model.hidden_states(idx)  # [1, T, C]
    vector = model.final_norm(x.to(model.final_norm.weight.dtype)).float().mean(dim=1)[0]  # [C]
    vector = vector[:dimensions]  # [min(C, dimensions)]
    if normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector.tolist()
