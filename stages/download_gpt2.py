"""Stage download_gpt2: fetch OpenAI's GPT-2 TensorFlow checkpoint of one size (the foundation in use)
from `download_gpt2.base_url` into the folder --out: checkpoint, hparams.json, model.ckpt.{index,meta,
data-00000-of-00001}, encoder.json, vocab.bpe. Unfinished files wait in --partial-dir to be resumed.

Honours GPTCORE_MIRROR (files served from gpt2/models/<size>/<file>).
"""

from gptcore.arguments import ArgumentParser
from gptcore.entry import run_entry
from gptcore.errors import ConfigError
from gptcore.openai import download_checkpoint
from gptcore.params import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--model", required=True, help="foundation name, e.g. gpt2-large")
    parser.add_argument("--out", required=True, help="folder for the seven files, e.g. models/openai/774M")
    parser.add_argument("--partial-dir", required=True, help="where unfinished downloads wait to be resumed")
    args = parser.parse_args()
    params = load_params(args.params)
    wanted = params.openai_models  # validated: exactly the OpenAI foundation in use
    if args.model not in wanted:
        raise ConfigError(f"--model {args.model}: not in params.yaml openai_models {wanted}")
    out = download_checkpoint(params.download_gpt2.base_url, wanted[args.model], args.out, partial_dir=args.partial_dir)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"download_gpt2: {args.model} ({wanted[args.model]}) -> {out} ({total:,} bytes)")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
