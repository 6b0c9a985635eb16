"""What int8 decoding (gptcore/inference/quantize.py) costs in quality, beside the same precision without it.

Two figures, on a model of your choosing (default: Stage 1's):
- perplexity on Stage 1's validation text (the corpus's last 1 - train_ratio share, windows of the
  model's context, as the pretrain stage evaluates), with and without int8 (every product through
  the decoding kernel: activations rounded per 32 as in decoding);
- greedy agreement on Stage 4's test instructions: the share of identical responses and of tokens
  before the first difference (benchmarks/greedy_agreement.py's measure).

    python benchmarks/int8_quality.py --model models/pretrained/model.safetensors \
        --corpus data/raw/the-verdict.txt --test data/prepared/instructions/test.json
"""

from __future__ import annotations

import json
import math

import torch
from greedy_agreement import agreement

from gptcore.arguments import ArgumentParser, positive_int
from gptcore.data.text import build_text_loaders
from gptcore.device import resolve_device
from gptcore.inference import gemv
from gptcore.inference.decoding import cast_for_inference
from gptcore.params.schema import GenerateParams, RunConfig
from gptcore.recipes.instruct import generate_responses
from gptcore.recipes.pretrain import read_corpus
from gptcore.tokenizer import get_tokenizer
from gptcore.training.evaluation import evaluate_loss, lm_loss
from gptcore.weights import load_model


def validation_loss(model_path: str, corpus: str, precision: str, quantize: str, train_ratio: float) -> float:
    """Mean next-token cross-entropy (nats) over every validation window of the corpus. Every int8
    product goes through the decoding kernel (gemv.MAX_ROWS raised for the call), so the activations
    are rounded per 32 as in decoding, not only the weights."""
    rows = gemv.MAX_ROWS[torch.int8]
    gemv.MAX_ROWS[torch.int8] = 1 << 30
    try:
        return _validation_loss(model_path, corpus, precision, quantize, train_ratio)
    finally:
        gemv.MAX_ROWS[torch.int8] = rows


def _validation_loss(model_path: str, corpus: str, precision: str, quantize: str, train_ratio: float) -> float:
    device = resolve_device("cpu")
    model = cast_for_inference(load_model(model_path, device), precision, quantize)
    context = model.config.context_length
    _, val_loader = build_text_loaders(
        read_corpus(corpus),
        get_tokenizer(),
        max_length=context,
        stride=context,
        batch_size=2,
        train_ratio=train_ratio,
        seed=123,
        source=corpus,
    )
    return evaluate_loss(model, val_loader, lm_loss, device, precision)


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="models/pretrained/model.safetensors", help="a language model's weights file"
    )
    parser.add_argument(
        "--corpus", default="data/raw/the-verdict.txt", help="Stage 1's text (its validation share is scored)"
    )
    parser.add_argument("--train-ratio", type=float, default=0.9, help="as params.yaml pretrain.train_ratio")
    parser.add_argument("--test", default="data/prepared/instructions/test.json", help="Stage 4's test split (JSON)")
    parser.add_argument("--precision", default="bf16-true", choices=("fp32", "bf16-true"), help="with and without int8")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy tokens per response")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together (left-padded)")
    args = parser.parse_args()

    row: dict = {"model": args.model, "precision": args.precision}
    responses = {}
    for quantize in ("none", "int8"):
        loss = validation_loss(args.model, args.corpus, args.precision, quantize, args.train_ratio)
        row[f"val_perplexity_{quantize}"] = round(math.exp(loss), 4)
        gen = GenerateParams(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, quantize=quantize)
        result = generate_responses(
            args.model, args.test, gen, RunConfig(device="cpu", precision=args.precision), show_progress=False
        )
        responses[quantize] = [r["model_response"] for r in result.responses]
    row["val_perplexity_change"] = round(row["val_perplexity_int8"] / row["val_perplexity_none"] - 1, 5)
    row.update(agreement(responses["none"], responses["int8"], get_tokenizer()))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
