"""An adapter file applied to the base weights file it was trained on: merged in memory (`--adapter` of
generate, serve and classify) or written as one weights file (`gptcore merge`).

The adapter records the SHA-256 of its base; another base is refused in one line. A classifier's adapter
carries its head and ClassifierInfo: on the language-model foundation it rebuilds the classifier.
"""

from __future__ import annotations

import os

import torch

from gptcore.download import sha256_of
from gptcore.model import GPTModel
from gptcore.recipes.adapters import write_merged_lm
from gptcore.recipes.classifier import METADATA_KEY, ClassifierInfo, build_classifier, parse_info, save_classifier
from gptcore.training.adapter_file import apply_adapter, read_adapter
from gptcore.training.lora import merge_lora
from gptcore.weights import load_model, load_state


def load_with_adapter(
    base_path: str | os.PathLike, adapter_path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[GPTModel, ClassifierInfo | None]:
    """The base weights file with the adapter file applied and merged (in memory; nothing is written).

    A classifier's adapter on a language-model base rebuilds the classifier (its head comes from the
    adapter); on a classifier base, the head must have the adapter's shape.

    Returns:
        The model in eval mode, and the classifier's ClassifierInfo (None for a language model).

    Raises:
        WeightsError: one line: the adapter was trained on another base (SHA-256), does not fit the base
            (a missing, unexpected or misshaped tensor: e.g. another head size), or is not an adapter file.
    """
    adapter = read_adapter(adapter_path)
    info = parse_info(adapter.extra[METADATA_KEY], adapter_path) if METADATA_KEY in adapter.extra else None
    config, state = load_state(base_path, device)
    if info is not None and config.num_classes is None:
        model = build_classifier(config, state, len(info.labels), device=device, source=str(base_path))
    else:
        model = load_model(base_path, device)
    apply_adapter(model, adapter, sha256_of(base_path))
    return merge_lora(model).eval(), info


def merge_adapter(base_path: str | os.PathLike, adapter_path: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """`gptcore merge`: write base + adapter as one weights file (a classifier's with its ClassifierInfo, a
    language model's with the adapter's metadata: gptcore.recipes.adapters.write_merged_lm).

    Returns:
        "classifier" or "language model": what was written.
    """
    if METADATA_KEY not in read_adapter(adapter_path).extra:
        write_merged_lm(base_path, adapter_path, out_path)
        return "language model"
    model, info = load_with_adapter(base_path, adapter_path)
    save_classifier(model, info, out_path)
    return "classifier"
