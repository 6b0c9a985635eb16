"""OpenAI's GPT-2 TensorFlow checkpoints: convert one into a weights file; the `foundation` stage's work.

A checkpoint folder holds OpenAI's seven files (fetched by gptcore/convert/openai_download.py, the
`download_gpt2` stage). The architecture comes from its hparams.json; the tensors from `model.ckpt`,
read one variable at a time with TensorFlow's checkpoint reader (TensorFlow is imported only by
`convert_checkpoint`) and written straight into the output file, so a conversion holds about one
tensor in memory, never the model twice.

How OpenAI's variables (gpt-2 `src/model.py`) map onto GPTModel: a declarative table of
(OpenAI variable, gptcore tensor, rule). The rules:
- `copy`: the same layout (embeddings, LayerNorm gains `g` and biases `b`, every bias).
- `conv`: OpenAI's `conv1d` keeps its weight as [1, nx, nf] and computes x @ w; nn.Linear keeps
  [nf, nx] and computes x @ W.T, so the weight is squeezed and transposed.
`attn/c_attn` needs no split: OpenAI projects to [q | k | v] along nf (`tf.split(c, 3, axis=2)`)
and then splits heads inside each third, which is exactly the layout of our fused `att.qkv`
(`view(B, T, 3, n_heads, head_dim)`), so c_attn maps straight onto it. The output head is tied to
`model/wte` as in GPT-2 and stored once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gptcore.atomic import atomic_path
from gptcore.config import GPTConfig
from gptcore.convert.openai_download import STAGE1_FOUNDATIONS, check_foundation
from gptcore.download import sha256_of
from gptcore.errors import WeightsError
from gptcore.model import GPTModel
from gptcore.weights import save_streaming

CHECKPOINT_PREFIX = "model.ckpt"
# The weights file in a Stage 1 foundation's folder, and the stage that writes it.
STAGE1_WEIGHTS = "model.safetensors"
_STAGE1_STAGE = {"pretrained": "pretrain", "scratch": "init_scratch"}
# hparams.json key -> GPTConfig field.
HPARAMS = {
    "n_vocab": "vocab_size",
    "n_ctx": "context_length",
    "n_embd": "emb_dim",
    "n_head": "n_heads",
    "n_layer": "n_layers",
}


@dataclass(frozen=True)
class Rule:
    """How a checkpoint array becomes a gptcore tensor, and the shape it must have in the checkpoint."""

    apply: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


RULES = {
    "copy": Rule(lambda a: a, lambda shape: shape),
    "conv": Rule(lambda a: a[0].T, lambda shape: (1, *reversed(shape))),  # [1, nx, nf] -> [nf, nx]
}

# (OpenAI variable, gptcore tensor, rule); BLOCK_NAMES repeat per layer as model/h{i}/ -> trf_blocks.{i}.
EMBEDDING_NAMES = (
    ("model/wte", "tok_emb.weight", "copy"),  # also the output head (tied)
    ("model/wpe", "pos_emb.weight", "copy"),
)
BLOCK_NAMES = (
    ("ln_1/g", "norm1.weight", "copy"),
    ("ln_1/b", "norm1.bias", "copy"),
    ("attn/c_attn/w", "att.qkv.weight", "conv"),  # [q | k | v] along nf: our fused layout, no split
    ("attn/c_attn/b", "att.qkv.bias", "copy"),
    ("attn/c_proj/w", "att.out_proj.weight", "conv"),
    ("attn/c_proj/b", "att.out_proj.bias", "copy"),
    ("ln_2/g", "norm2.weight", "copy"),
    ("ln_2/b", "norm2.bias", "copy"),
    ("mlp/c_fc/w", "ff.fc.weight", "conv"),
    ("mlp/c_fc/b", "ff.fc.bias", "copy"),
    ("mlp/c_proj/w", "ff.proj.weight", "conv"),
    ("mlp/c_proj/b", "ff.proj.bias", "copy"),
)
FINAL_NAMES = (
    ("model/ln_f/g", "final_norm.weight", "copy"),
    ("model/ln_f/b", "final_norm.bias", "copy"),
)


def name_table(n_layers: int) -> list[tuple[str, str, str]]:
    """Every (OpenAI variable, gptcore tensor, rule) of an n_layers model, in file order."""
    blocks = [
        (f"model/h{i}/{source}", f"trf_blocks.{i}.{target}", rule)
        for i in range(n_layers)
        for source, target, rule in BLOCK_NAMES
    ]
    return [*EMBEDDING_NAMES, *blocks, *FINAL_NAMES]


def read_hparams(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig that an OpenAI hparams.json describes (GPT-2: q/k/v biases, tied head, no dropout)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not valid JSON: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object of hyperparameters")
    missing = [k for k in HPARAMS if k not in data]
    unknown = sorted(set(data) - set(HPARAMS))
    if missing or unknown:
        what = f"missing {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(unknown)}"
        raise WeightsError(f"{path}: {what}; expected exactly {', '.join(HPARAMS)}")
    for key in HPARAMS:
        if not isinstance(data[key], int) or isinstance(data[key], bool):
            raise WeightsError(f"{path}: {key} must be an integer, got {data[key]!r}")
    try:
        return GPTConfig(
            **{field: data[key] for key, field in HPARAMS.items()}, drop_rate=0.0, qkv_bias=True, tie_embeddings=True
        )
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None


@dataclass(frozen=True)
class Conversion:
    """What convert_checkpoint wrote."""

    config: GPTConfig
    tensors: int
    parameters: int


def convert_checkpoint(ckpt_dir: str | os.PathLike, out: str | os.PathLike, show_progress: bool = False) -> Conversion:
    """Convert an OpenAI GPT-2 checkpoint folder into one gptcore weights file, written atomically.

    Every variable of the name table must be in the checkpoint with the shape hparams.json implies,
    and nothing else may be: any difference is a one-line WeightsError naming the variable.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise WeightsError(f"{ckpt_dir}: checkpoint folder not found")
    config = read_hparams(ckpt_dir / "hparams.json")
    _check_vocabulary(ckpt_dir)
    prefix = ckpt_dir / CHECKPOINT_PREFIX
    if not (ckpt_dir / f"{CHECKPOINT_PREFIX}.index").is_file():
        raise WeightsError(f"{prefix}.index: missing from the checkpoint")
    data_files = sorted(ckpt_dir.glob(f"{CHECKPOINT_PREFIX}.data-*"))
    if not data_files:
        raise WeightsError(f"{prefix}.data-00000-of-00001: missing from the checkpoint")

    table = name_table(config.n_layers)
    with torch.device("meta"):
        targets = {k: tuple(v.shape) for k, v in GPTModel(config).state_dict().items() if k != "out_head.weight"}
    if sorted(t for _, t, _ in table) != sorted(targets):
        raise RuntimeError("the OpenAI name table does not cover GPTModel's tensors")  # a bug, not bad input
    expected = {source: RULES[rule].source_shape(targets[target]) for source, target, rule in table}

    tf = _tensorflow()
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        found = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as err:
        raise WeightsError(f"{prefix}.index: unreadable checkpoint index: {_one_line(err)}") from None
    _check_variables(prefix, expected, found, dtypes, data_files)

    by_target = {target: (source, RULES[rule]) for source, target, rule in table}
    bar = tqdm(total=len(table), unit="tensor", desc="convert", disable=not show_progress)

    def read(target: str) -> np.ndarray:
        source, rule = by_target[target]
        try:
            array = reader.get_tensor(source)
        except tf.errors.OpError as err:
            raise WeightsError(
                f"{prefix}: cannot read {source} (corrupt or truncated data file): {_one_line(err)}"
            ) from None
        bar.update()
        return rule.apply(np.asarray(array, dtype=np.float32))

    shapes = {target: targets[target] for _, target, _ in table}
    try:
        save_streaming(out, config, shapes, read)
    finally:
        bar.close()
    return Conversion(config=config, tensors=len(table), parameters=sum(math.prod(s) for s in shapes.values()))


def _check_variables(prefix: Path, expected: dict, found: dict, dtypes: dict, data_files: list[Path]) -> None:
    """The checkpoint holds exactly the expected variables, each with its shape and a float dtype, and
    its data files are long enough for all of them (a truncated download fails here, before any work)."""
    for name, shape in expected.items():
        if name not in found:
            raise WeightsError(f"{prefix}: variable {name} missing ({len(set(expected) - set(found))} missing)")
        if tuple(found[name]) != shape:
            raise WeightsError(
                f"{prefix}: variable {name} has shape {list(found[name])}, expected {list(shape)} from hparams.json"
            )
        if not dtypes[name].is_floating:
            raise WeightsError(f"{prefix}: variable {name} has dtype {dtypes[name].name}, expected a float type")
    unused = sorted(set(found) - set(expected))
    if unused:
        raise WeightsError(f"{prefix}: unexpected variable {unused[0]} ({len(unused)} not in the GPT-2 name table)")
    need = sum(math.prod(found[n]) * dtypes[n].size for n in expected)
    have = sum(f.stat().st_size for f in data_files)
    if have < need:
        raise WeightsError(f"{data_files[0]}: {have:,} bytes, but the index needs {need:,} (truncated download?)")


def _check_vocabulary(ckpt_dir: Path) -> None:
    """encoder.json / vocab.bpe, where present, must be GPT-2's: gptcore's tokenizer is fixed to them."""
    from gptcore.tokenizer import FILES

    for name, digest in FILES.items():
        path = ckpt_dir / name
        if path.is_file() and sha256_of(path) != digest:
            raise WeightsError(
                f"{path}: not GPT-2's {name} (SHA-256 mismatch); gptcore's tokenizer would not fit this model"
            )


# What quiets TensorFlow's import: its C++ info and warning lines, and oneDNN's numerics notice (we only
# read files). Read by TensorFlow when imported, so they are process settings: entry points that convert
# (`gptcore convert`, stages/foundation.py) set them (gptcore.entry.set_environ_defaults); a library
# call does not.
TENSORFLOW_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def _tensorflow():
    """TensorFlow, imported here only: it is slow to import and nothing else needs it."""
    try:
        import tensorflow as tf
    except ImportError:
        raise WeightsError("reading OpenAI checkpoints needs TensorFlow: pip install tensorflow-cpu") from None
    return tf


def prepare_foundation(
    foundation: str, source: str | os.PathLike, out: str | os.PathLike, *, show_progress: bool = True
) -> str:
    """Write the weights file `out` that the finetuning stages start from, as params `foundation` names it,
    from `source`, that foundation's folder (models/<foundation>/ in the pipeline).

    `pretrained` / `scratch`: Stage 1's folder; its weights file (STAGE1_WEIGHTS) is copied. An OpenAI
    name (gpt2-small … gpt2-xl): the TensorFlow checkpoint folder that the `download_gpt2` stage fetched
    (gptcore/convert/openai_download.py); it is converted. The write is atomic.

    Returns:
        what was read (a file or a folder), for the stage's report.
    Raises:
        ConfigError: an unknown foundation name (the valid ones listed).
        WeightsError: Stage 1's weights file missing, or a checkpoint folder that does not convert.
    """
    check_foundation(foundation)
    source = Path(source)
    if foundation in STAGE1_FOUNDATIONS:
        weights = source / STAGE1_WEIGHTS
        if not weights.is_file():
            raise WeightsError(f"{weights}: no such file; run Stage 1 first (dvc repro {_STAGE1_STAGE[foundation]})")
        with atomic_path(out) as tmp:
            shutil.copyfile(weights, tmp)
        return str(weights)
    convert_checkpoint(source, out, show_progress=show_progress)
    return str(source)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
