"""Serving throughput: N concurrent clients against one at a time, over real HTTP to `gptcore serve`.

    python -m gptcore.bench.serving [--preset gpt2-small] [--clients 8] [--prompt-len 50] [--new-tokens 100]

A model of the preset's shape with random weights (seeded) is saved to a temporary file and served on a
free loopback port; every client sends its own prompt of `--prompt-len` tokens for `--new-tokens` greedy
tokens (fp32, no end-of-text stop: `num_predict` is honoured exactly unless end of text comes first).
Each round runs every client alone, one after another, then all at once; prints the rates of every
round, the ratio of the best of each, whether every client got the same tokens both ways, and the load
average, since the machine may be shared.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path


def _prompts(tokenizer, clients: int, length: int, seed: int) -> list[str]:
    """Texts of `length` tokens each: space-prefixed words that are single tokens, drawn at random."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if w.startswith(" ") and w[1:].isalpha()]
    return ["".join(rng.choice(words) for _ in range(length)) for _ in range(clients)]


def _generate(url: str, name: str, prompt: str, new_tokens: int) -> dict:
    import requests

    body = {"model": name, "prompt": prompt, "stream": False, "options": {"temperature": 0, "num_predict": new_tokens}}
    reply = requests.post(url + "/api/generate", json=body, timeout=3600)
    reply.raise_for_status()
    return reply.json()


def run(
    preset: str,
    clients: int,
    prompt_len: int,
    new_tokens: int,
    seed: int = 0,
    repeats: int = 2,
    precision: str = "fp32",
    quantize: str = "none",
) -> dict:
    from gptcore.config import GPTConfig
    from gptcore.model import random_model
    from gptcore.serve import Limits, LoadOptions, Server
    from gptcore.tokenizer import get_tokenizer
    from gptcore.weights import save_model

    prompts = _prompts(get_tokenizer(), clients, prompt_len, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        save_model(random_model(GPTConfig.from_name(preset), seed=seed), path)  # the caller's RNG untouched
        server = Server(
            path,
            "127.0.0.1",
            0,
            name="bench",
            device="cpu",
            load=LoadOptions(precision=precision, quantize=quantize),
            quiet=True,
            limits=Limits(max_batch=max(clients, 1)),
        ).start()
        try:
            _generate(server.url, "bench", prompts[0], 5)  # warm-up
            rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
            for _ in range(repeats):  # alternated, so that a busy spell of a shared machine hits both
                start = time.perf_counter()
                alone = [_generate(server.url, "bench", p, new_tokens) for p in prompts]
                rates["sequential"].append(sum(r["eval_count"] for r in alone) / (time.perf_counter() - start))
                together: list[dict | None] = [None] * clients

                def client(i: int, together: list[dict | None] = together) -> None:
                    together[i] = _generate(server.url, "bench", prompts[i], new_tokens)

                threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rates["concurrent"].append(sum(r["eval_count"] for r in together) / (time.perf_counter() - start))
                same = all(a["context"] == b["context"] for a, b in zip(alone, together))
        finally:
            server.close()
    best = {k: max(v) for k, v in rates.items()}
    return {
        "preset": preset,
        "precision": precision,
        "quantize": quantize,
        "clients": clients,
        "prompt_tokens": [r["prompt_eval_count"] for r in alone],
        "new_tokens": [r["eval_count"] for r in alone],
        "sequential_tokens_per_s": [round(r, 2) for r in rates["sequential"]],
        "concurrent_tokens_per_s": [round(r, 2) for r in rates["concurrent"]],
        "speedup_best": round(best["concurrent"] / best["sequential"], 2),
        "same_tokens": same,
        "torch_threads": __import__("torch").get_num_threads(),
        "loadavg_after": os.getloadavg(),
    }


def build_parser():
    from gptcore.arguments import ArgumentParser, non_negative_int, positive_int
    from gptcore.config import PRESETS
    from gptcore.precision import PRECISIONS

    parser = ArgumentParser(prog="python -m gptcore.bench.serving", description=__doc__)
    parser.add_argument("--preset", default="gpt2-small", choices=list(PRESETS), help="model shape (random weights)")
    parser.add_argument("--clients", type=positive_int, default=8, help="concurrent clients, each with its own prompt")
    parser.add_argument("--prompt-len", type=positive_int, default=50, help="prompt tokens per client")
    parser.add_argument("--new-tokens", type=positive_int, default=100, help="greedy new tokens per client")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds the weights and the prompts")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        help="as gptcore serve --precision (fp32: every client's tokens must equal its tokens alone)",
    )
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8"], help="as gptcore serve --quantize (int8 weights)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=2,
        help="rounds of (one at a time, all at once); the ratio takes the best of each",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print("load average before:", os.getloadavg(), flush=True)
    print(
        json.dumps(
            run(
                args.preset,
                args.clients,
                args.prompt_len,
                args.new_tokens,
                args.seed,
                args.repeats,
                args.precision,
                args.quantize,
            )
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
