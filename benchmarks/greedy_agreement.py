"""Greedy agreement between fp32 and another precision (default: what `auto` picks for inference here).

Finetunes a language model briefly on the first instruction entries (so that its choices are not
random), then answers the test instructions greedily at both precisions, and prints the share of
identical responses and of identical tokens (position by position, up to the shorter response).

    python benchmarks/greedy_agreement.py --model models/pretrained/model.safetensors \
        --train data/prepared/instructions/train.json --val data/prepared/instructions/validation.json \
        --test data/prepared/instructions/test.json --steps 20 --max-new-tokens 64
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gptcore.arguments import ArgumentParser, non_negative_int, positive_int
from gptcore.device import resolve_device
from gptcore.inference.decoding import resolve_decoding_precision
from gptcore.params.schema import GenerateParams, InstructionsParams, RunConfig
from gptcore.recipes.instruct import finetune_instructions, generate_responses
from gptcore.weights import save_model


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="foundation weights file")
    parser.add_argument("--train", required=True, help="Stage 4 training split (JSON), for the short finetuning")
    parser.add_argument("--val", required=True, help="Stage 4 validation split (JSON)")
    parser.add_argument("--test", required=True, help="Stage 4 test split (JSON): the prompts compared")
    parser.add_argument("--steps", type=non_negative_int, default=20, help="finetuning steps of batch 8 (0: none)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy tokens per response")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together (left-padded)")
    parser.add_argument("--precision", default="auto", help="compared with fp32 (auto: as resolved for inference)")
    args = parser.parse_args()

    device = resolve_device("cpu")
    other, _ = resolve_decoding_precision(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(args.model)
        if args.steps:
            entries = json.loads(Path(args.train).read_text())[: 8 * args.steps]
            subset = Path(tmp) / "train.json"
            subset.write_text(json.dumps(entries))
            params = InstructionsParams(epochs=1, batch_size=8, eval_every=args.steps, eval_batches=1)
            outcome = finetune_instructions(
                model_path, subset, args.val, params, RunConfig(device="cpu", precision="fp32")
            )
            model_path = Path(tmp) / "model.safetensors"
            save_model(outcome.model, model_path)
            print(
                f"finetuned {outcome.result.steps} steps: val loss {outcome.metrics['val_loss_before']:.3f} -> "
                f"{outcome.metrics['val_loss']:.3f}"
            )
        gen = GenerateParams(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        runs = {}
        for precision in ("fp32", other):
            torch.manual_seed(0)
            result = generate_responses(model_path, args.test, gen, RunConfig(device="cpu", precision=precision))
            runs[precision] = result
            print(
                f"{precision}: {result.metrics['tokens_generated']} tokens, {result.metrics['tokens_per_second']} tokens/s"
            )
    from gptcore.tokenizer import get_tokenizer

    a, b = ([r["model_response"] for r in runs[p].responses] for p in ("fp32", other))
    print(json.dumps({"compared": ["fp32", other], **agreement(a, b, get_tokenizer())}))


def agreement(a: list[str], b: list[str], tokenizer) -> dict:
    """How far two lists of responses agree: identical responses, and tokens before the first difference."""
    same = sum(x == y for x, y in zip(a, b))
    matched = total = 0
    for x, y in zip(a, b):
        ids_x, ids_y = tokenizer.encode(x, disallowed_special=()), tokenizer.encode(y, disallowed_special=())
        prefix = next((i for i, (p, q) in enumerate(zip(ids_x, ids_y)) if p != q), min(len(ids_x), len(ids_y)))
        matched += prefix
        total += max(len(ids_x), len(ids_y))
    return {
        "responses": len(a),
        "identical_responses": same,
        "identical_share": round(same / len(a), 4),
        "tokens_before_first_difference": matched,
        "tokens": total,
        "identical_token_share": round(matched / total, 4) if total else None,
    }


if __name__ == "__main__":
    main()
