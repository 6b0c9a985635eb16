"""Stage init_scratch: a randomly initialised model of the Stage 1 architecture (`pretrain.model`,
drawn as `init_scratch.init` says), the `scratch` foundation of the finetuning stages. Writes one
weights file to --out."""

from gptcore.arguments import ArgumentParser
from gptcore.entry import run_entry
from gptcore.model import random_model
from gptcore.params.load import load_params
from gptcore.weights import save_model


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--out", required=True, help="weights file to write")
    args = parser.parse_args()
    params = load_params(args.params)
    model = random_model(params.pretrain.model, params.init_scratch.init, seed=params.seed)
    save_model(model, args.out)
    print(f"init_scratch: {model.num_parameters():,} parameters -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
