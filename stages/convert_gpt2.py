"""Stage convert_gpt2: convert an OpenAI GPT-2 TensorFlow checkpoint folder (--checkpoint, the output of
download_gpt2) into one gptcore weights file (--out), the architecture taken from its hparams.json."""

from gptcore.arguments import ArgumentParser
from gptcore.entry import run_entry, set_environ_defaults
from gptcore.openai import TENSORFLOW_ENV, convert_checkpoint
from gptcore.params import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--checkpoint", required=True, help="folder with hparams.json and model.ckpt.*")
    parser.add_argument("--out", required=True, help="weights file, e.g. models/gpt2-large/model.safetensors")
    args = parser.parse_args()
    load_params(args.params)  # not read here, but a bad value anywhere stops every stage
    set_environ_defaults(TENSORFLOW_ENV)  # before TensorFlow is imported
    result = convert_checkpoint(args.checkpoint, args.out, progress=True)
    c = result.config
    print(
        f"convert_gpt2: {result.parameters:,} parameters ({c.n_layers} layers, {c.n_heads} heads, "
        f"emb {c.emb_dim}, context {c.context_length}) -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
