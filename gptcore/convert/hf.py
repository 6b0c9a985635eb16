"""Hugging Face transformers' GPT-2 and gptcore: the shared name table, and the import of a folder.

A `save_pretrained` folder of GPT2LMHeadModel (or GPT2Model) holds `config.json` and the weights
(`model.safetensors`, sharded `model.safetensors.index.json`, or a `pytorch_model.bin` read with
`torch.load(weights_only=True)`). transformers itself is never imported: the layout is fixed by its
`modeling_gpt2.py` (transformers 5.x, the same as OpenAI's checkpoints):
- `copy`: embeddings, LayerNorms, every bias.
- `conv`: GPT-2's `Conv1D` keeps its weight as [in, out] and computes x @ W; nn.Linear keeps
  [out, in], so the weight is transposed. `c_attn` is [q | k | v] along `out`, our fused layout.
Names may carry the `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model); the causal-mask
buffers `attn.bias` / `attn.masked_bias` that old files hold are not weights and are skipped (as
llama.cpp's converter does). The output head is `lm_head.weight`, stored only when untied.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptcore.config import GPTConfig
from gptcore.errors import WeightsError
from gptcore.model import GPTModel
from gptcore.weights import save_streaming

PREFIX = "transformer."
# config.json keys that carry a GPTConfig field.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "context_length",
    "n_embd": "emb_dim",
    "n_head": "n_heads",
    "n_layer": "n_layers",
}
# Written by gptcore's export when the model had no q/k/v bias (then stored as zeros, which HF requires).
QKV_BIAS_KEY = "gptcore_qkv_bias"
# GPT-2's GELU is the tanh approximation; transformers names it either way.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # gptcore.model's LayerNorm eps (GPT-2's)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Rule:
    """How an HF tensor becomes a gptcore tensor (`to_gptcore`) and back (`to_hf`)."""

    to_gptcore: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


RULES = {
    "copy": Rule(lambda a: a, lambda a: a),
    "conv": Rule(lambda a: a.T, lambda a: a.T),  # Conv1D [in, out] <-> nn.Linear [out, in]
}

# (HF tensor without the `transformer.` prefix, gptcore tensor, rule); blocks repeat as h.{i}. -> trf_blocks.{i}.
EMBEDDING_NAMES = (
    ("wte.weight", "tok_emb.weight", "copy"),
    ("wpe.weight", "pos_emb.weight", "copy"),
)
BLOCK_NAMES = (
    ("ln_1.weight", "norm1.weight", "copy"),
    ("ln_1.bias", "norm1.bias", "copy"),
    ("attn.c_attn.weight", "att.qkv.weight", "conv"),
    ("attn.c_attn.bias", "att.qkv.bias", "copy"),  # zeros in HF when gptcore has none
    ("attn.c_proj.weight", "att.out_proj.weight", "conv"),
    ("attn.c_proj.bias", "att.out_proj.bias", "copy"),
    ("ln_2.weight", "norm2.weight", "copy"),
    ("ln_2.bias", "norm2.bias", "copy"),
    ("mlp.c_fc.weight", "ff.fc.weight", "conv"),
    ("mlp.c_fc.bias", "ff.fc.bias", "copy"),
    ("mlp.c_proj.weight", "ff.proj.weight", "conv"),
    ("mlp.c_proj.bias", "ff.proj.bias", "copy"),
)
FINAL_NAMES = (
    ("ln_f.weight", "final_norm.weight", "copy"),
    ("ln_f.bias", "final_norm.bias", "copy"),
)
LM_HEAD = ("lm_head.weight", "out_head.weight", "copy")  # outside `transformer.`; untied heads only
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old files


def name_table(config: GPTConfig) -> list[tuple[str, str, str]]:
    """Every (HF tensor, gptcore tensor, rule) of the transformer body, in file order; HF names
    without the `transformer.` prefix. The head (lm_head / score) is not in it."""
    blocks = [
        (f"h.{i}.{source}", f"trf_blocks.{i}.{target}", rule)
        for i in range(config.n_layers)
        for source, target, rule in BLOCK_NAMES
    ]
    return [*EMBEDDING_NAMES, *blocks, *FINAL_NAMES]


def config_from_hf(data: dict[str, Any], source: str) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 config.json, or a WeightsError naming what gptcore cannot run."""
    if data.get("model_type") != "gpt2":
        raise WeightsError(f'{source}: model_type is {data.get("model_type")!r}; gptcore imports GPT-2 ("gpt2") only')
    architectures = data.get("architectures") or ["GPT2LMHeadModel"]
    if any(a not in ("GPT2LMHeadModel", "GPT2Model") for a in architectures):
        raise WeightsError(f"{source}: architectures {architectures}; gptcore imports GPT2LMHeadModel / GPT2Model only")
    missing = [k for k in CONFIG_FIELDS if not isinstance(data.get(k), int)]
    if missing:
        raise WeightsError(f"{source}: missing or non-integer {', '.join(missing)}")
    checks = [
        (
            data.get("n_inner") in (None, 4 * data["n_embd"]),
            f"n_inner {data.get('n_inner')} (gptcore's MLP is 4 * n_embd)",
        ),
        (
            data.get("activation_function", "gelu_new") in GELU_TANH,
            f"activation_function {data.get('activation_function')!r} (gptcore uses GELU's tanh form, gelu_new)",
        ),
        (
            math.isclose(data.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS),
            f"layer_norm_epsilon {data.get('layer_norm_epsilon')} (gptcore uses {LAYER_NORM_EPS})",
        ),
        (data.get("scale_attn_weights", True), "scale_attn_weights false"),
        (not data.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx true"),
        (not data.get("add_cross_attention", False), "add_cross_attention true"),
    ]
    for ok, what in checks:
        if not ok:
            raise WeightsError(f"{source}: {what}; gptcore's GPT-2 cannot run it")
    dropouts = {data.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) != 1:
        raise WeightsError(f"{source}: resid_pdrop, embd_pdrop and attn_pdrop differ; gptcore has one drop_rate")
    try:
        return GPTConfig(
            **{field: data[key] for key, field in CONFIG_FIELDS.items()},
            drop_rate=float(dropouts.pop()),
            qkv_bias=data.get(QKV_BIAS_KEY, True) is not False,
            tie_embeddings=bool(data.get("tie_word_embeddings", True)),
        )
    except ValueError as err:
        raise WeightsError(f"{source}: {err}") from None


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The transformers GPT2Config fields of a gptcore language model (GPT2LMHeadModel)."""
    data: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,  # read by llama.cpp's convert_hf_to_gguf.py
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }
    if not config.qkv_bias:
        data[QKV_BIAS_KEY] = False
    return data


@dataclass(frozen=True)
class Conversion:
    """What convert_hf_folder wrote."""

    config: GPTConfig
    tensors: int
    parameters: int


def is_hf_folder(folder: str | os.PathLike) -> bool:
    """True when `folder` is a transformers save_pretrained folder (a config.json) rather than an OpenAI
    checkpoint (an hparams.json)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "hparams.json").is_file()


def convert_hf_folder(folder: str | os.PathLike, out: str | os.PathLike) -> Conversion:
    """Convert a transformers GPT-2 folder into one gptcore weights file, written atomically.

    Every tensor of the name table must be there with the shape config.json implies and nothing else
    may be (besides the mask buffers and a tied head's copy); a difference is a one-line WeightsError.
    Peak memory is about one tensor for safetensors; a pytorch_model.bin is memory-mapped where its
    format allows (torch >= 1.6 zip files), else read whole.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: folder not found")
    config_path = folder / "config.json"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{config_path}: not found") from None
    except (OSError, ValueError) as err:
        raise WeightsError(f"{config_path}: not valid JSON: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{config_path}: expected a JSON object")
    config = config_from_hf(data, str(config_path))
    _check_vocabulary(folder)
    tensors = _open_tensors(folder)
    source = {name[len(PREFIX) :] if name.startswith(PREFIX) else name: name for name in tensors.names}

    table = name_table(config)
    if not config.tie_embeddings:
        table.append(LM_HEAD)
    with torch.device("meta"):
        targets = {k: tuple(v.shape) for k, v in GPTModel(config).state_dict().items()}
    if config.tie_embeddings:
        targets.pop("out_head.weight")
    if not config.qkv_bias:
        # gptcore's export wrote zeros for the missing bias; non-zero values would be trained ones.
        table = [row for row in table if not row[1].endswith("att.qkv.bias")]
        for i in range(config.n_layers):
            name = f"h.{i}.attn.c_attn.bias"
            if name in source and np.any(tensors.read(source[name]) != 0):
                raise WeightsError(f"{folder}: {QKV_BIAS_KEY} is false but {name} is not zero")
    by_target = {target: (name, RULES[rule]) for name, target, rule in table}
    if sorted(by_target) != sorted(targets):
        raise RuntimeError("the Hugging Face name table does not cover GPTModel's tensors")  # a bug, not bad input

    for name, target, rule in table:
        if name not in source:
            raise WeightsError(
                f"{folder}: tensor {name} missing ({len(set(n for n, _, _ in table) - set(source))} missing)"
            )
        shape = tensors.shape(source[name])
        want = targets[target] if rule == "copy" else tuple(reversed(targets[target]))
        if shape != want:
            raise WeightsError(
                f"{folder}: tensor {name} has shape {list(shape)}, expected {list(want)} from config.json"
            )
    known = {n for n, _, _ in table} | {"lm_head.weight"} | {f"h.{i}.attn.c_attn.bias" for i in range(config.n_layers)}
    unused = sorted(n for n in source if n not in known and not n.endswith(SKIPPED_SUFFIXES))
    if unused:
        raise WeightsError(f"{folder}: unexpected tensor {unused[0]} ({len(unused)} not in the GPT-2 name table)")

    def read(target: str) -> np.ndarray:
        name, rule = by_target[target]
        return rule.to_gptcore(tensors.read(source[name]))

    shapes = {target: targets[target] for _, target, _ in table}
    save_streaming(out, config, shapes, read)
    return Conversion(config=config, tensors=len(table), parameters=sum(math.prod(s) for s in shapes.values()))


def _check_vocabulary(folder: Path) -> None:
    """vocab.json / merges.txt, where present, must be GPT-2's: gptcore's tokenizer is fixed to them."""
    from gptcore.tokenizer import find_tokenizer_files

    reference = find_tokenizer_files()
    checks = (
        ("vocab.json", lambda p: json.loads(p.read_text(encoding="utf-8")), "encoder.json"),
        (
            "merges.txt",
            lambda p: [line for line in p.read_text(encoding="utf-8").splitlines()[1:] if line],
            "vocab.bpe",
        ),
    )
    for name, parse, ours in checks:
        path = folder / name
        if path.is_file():
            try:
                same = parse(path) == parse(reference / ours)
            except (OSError, ValueError) as err:
                raise WeightsError(f"{path}: unreadable: {' '.join(str(err).split())}") from None
            if not same:
                raise WeightsError(f"{path}: not GPT-2's {ours}; gptcore's tokenizer would not fit this model")


class _Tensors:
    """Named tensors of a folder's weight files, read one at a time as float32 numpy arrays."""

    def __init__(self, getters: dict[str, Callable[[], Any]], shapes: dict[str, tuple[int, ...]], source: str):
        self._get, self._shapes, self.source = getters, shapes, source
        self.names = list(getters)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> np.ndarray:
        value = self._get[name]()
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise WeightsError(f"{self.source}: tensor {name} has dtype {value.dtype}, expected a float type")
            return value.detach().to(torch.float32).numpy()
        return np.asarray(value, dtype=np.float32)


def _open_tensors(folder: Path) -> _Tensors:
    """The tensors of model.safetensors, of the shards a model.safetensors.index.json lists, or of
    pytorch_model.bin (weights_only: no pickled code runs)."""
    from safetensors import SafetensorError, safe_open

    files: list[Path]
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index_path = folder / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"{index_path}: not a safetensors index ({' '.join(str(err).split())})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        return _open_bin(folder / "pytorch_model.bin")
    else:
        raise WeightsError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})")
    getters: dict[str, Callable[[], Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    getters[name] = lambda path=path, name=name: _read_one(path, name)
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file: {' '.join(str(err).split())}") from None
    return _Tensors(getters, shapes, str(folder))


def _read_one(path: Path, name: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: corrupt or truncated tensor {name}: {' '.join(str(err).split())}") from None


def _open_bin(path: Path) -> _Tensors:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a pre-zip (legacy) file
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(
            f"{path}: not a loadable PyTorch state dict (weights only): {' '.join(str(err).split())}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return _Tensors(
        {k: (lambda v=v: v) for k, v in state.items()}, {k: tuple(v.shape) for k, v in state.items()}, str(path)
    )
