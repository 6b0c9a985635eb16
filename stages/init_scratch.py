"""Stage init_scratch: a randomly initialised model of the Stage 1 architecture (`pretrain.model`,
drawn as `init_scratch.init` says), the `scratch` foundation of the finetuning stages. Writes one
weights file to --out."""

import argparse

import torch

from gptcore.entry import run_entry
from gptcore.config import PretrainParams, ScratchParams
from gptcore.model import random_model
from gptcore.params import read_params, run_config, section
from gptcore.weights import save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = read_params(args.params)
    config = section(params, "pretrain", PretrainParams).model
    scratch = section(params, "init_scratch", ScratchParams)
    torch.manual_seed(run_config(params).seed)
    model = random_model(config, scratch.init)
    save_model(model, args.out)
    print(f"init_scratch: {model.num_parameters():,} parameters -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
