"""A gptcore weights file -> a Hugging Face transformers folder (GPT2LMHeadModel or GPT2ForSequenceClassification).

The folder holds what `from_pretrained` reads offline: `config.json`, `model.safetensors` (names and
layouts of transformers' modeling_gpt2.py, through gptcore.convert.hf's name table), GPT-2's tokenizer files
(`vocab.json` = encoder.json, `merges.txt` = vocab.bpe, `tokenizer_config.json`) and, for a language
model, `generation_config.json`. A model without q/k/v bias gets zero biases (transformers' GPT-2
always has them) and `gptcore_qkv_bias: false` in config.json, so that importing it back restores
the same gptcore config. Tensors are converted and written one at a time.

A classifier exports as GPT2ForSequenceClassification only where that computes the same function:
- transformers classifies at the last token that is not `pad_token_id`, gptcore's
  `token_position: last_non_pad` with pad 50256 (texts never contain it); `last` reads the padded
  length's last position, which GPT2ForSequenceClassification cannot reproduce, and is refused.
- transformers' `score` head has no bias, gptcore's has. Since the final LayerNorm feeds only the
  head, the bias b moves into it exactly: with W the head's weight, ln_f.bias += d where W d = b
  (d = pinv(W) b, which solves it for any W of full row rank). Class logits are unchanged up to float
  rounding; transformers' `last_hidden_state` (the ln_f output) shifts by d.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from gptcore.atomic import atomic_dir
from gptcore.config import GPTConfig
from gptcore.convert.hf import LM_HEAD, PREFIX, RULES, config_to_hf, name_table
from gptcore.errors import WeightsError
from gptcore.export.templates import jinja_chat_template
from gptcore.tokenizer import ENDOFTEXT, EOT_ID, find_tokenizer_files
from gptcore.weights import read_config, read_metadata, write_safetensors

CLASSIFIER_KEY = (
    "gptcore_classifier"  # gptcore.recipes.classifier.METADATA_KEY (not imported: exports do not depend on recipes)
)


@dataclass(frozen=True)
class HfExport:
    """What export_hf wrote."""

    path: Path
    config: GPTConfig
    architecture: str
    tensors: int


def export_hf(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    chat_template: bool = True,
) -> HfExport:
    """Write the gptcore weights file `model_path` as a transformers folder `out` (swapped in atomically).

    chat_template: a language model's tokenizer_config.json gets the Alpaca chat template
    (gptcore.export.templates), for `tokenizer.apply_chat_template`.

    Raises:
        WeightsError: a missing or unreadable file, or a classifier that GPT2ForSequenceClassification
            cannot reproduce (token_position `last`, a pad id other than 50256, a head of deficient rank).
    """
    model_path, out = Path(model_path), Path(out)
    config = read_config(model_path)
    table = [(PREFIX + hf, ours, rule) for hf, ours, rule in name_table(config)]
    with safe_open(str(model_path), framework="numpy") as f:
        stored = set(f.keys())

        def get(name: str) -> np.ndarray:
            if name not in stored:
                raise WeightsError(f"{model_path}: tensor {name} missing")
            return f.get_tensor(name).astype(np.float32, copy=False)

        def shape_of(name: str) -> tuple[int, ...]:
            if name not in stored:
                raise WeightsError(f"{model_path}: tensor {name} missing")
            return tuple(f.get_slice(name).get_shape())

        head_bias_fold = None
        if config.num_classes is None:
            data = config_to_hf(config)
            architecture = "GPT2LMHeadModel"
            if not config.tie_embeddings:
                table.append(LM_HEAD)
        else:
            data, head_bias_fold, max_length = _classifier_config(model_path, config, get)
            architecture = "GPT2ForSequenceClassification"
            table.append(("score.weight", "out_head.weight", "copy"))

        shapes = _hf_shapes(table, config, shape_of)
        by_name = {hf_name: (ours, RULES[rule]) for hf_name, ours, rule in table}

        def read(hf_name: str) -> np.ndarray:
            ours, rule = by_name[hf_name]
            if ours.endswith("att.qkv.bias") and not config.qkv_bias:
                return np.zeros(shapes[hf_name], dtype=np.float32)
            array = rule.to_hf(get(ours))
            if ours == "final_norm.bias" and head_bias_fold is not None:
                array = array + head_bias_fold
            return array

        tokenizer_files = find_tokenizer_files(tokenizer_dir)
        with atomic_dir(out) as tmp:
            write_safetensors(tmp / "model.safetensors", shapes, read, {"format": "pt"})
            _write_json(tmp / "config.json", data)
            model_max_length = config.context_length if config.num_classes is None else max_length
            _write_tokenizer(tmp, tokenizer_files, model_max_length, config.num_classes is not None, chat_template)
            if config.num_classes is None:
                _write_json(
                    tmp / "generation_config.json",
                    {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID},
                )
    return HfExport(path=out, config=config, architecture=architecture, tensors=len(table))


def _hf_shapes(table: list[tuple[str, str, str]], config: GPTConfig, shape_of) -> dict[str, tuple[int, ...]]:
    """Each transformers tensor's shape: the stored one, reversed where the rule transposes; q/k/v biases always."""
    shapes: dict[str, tuple[int, ...]] = {}
    for hf_name, ours, rule in table:
        if ours.endswith("att.qkv.bias") and not config.qkv_bias:
            shapes[hf_name] = (3 * config.emb_dim,)
        else:
            shape = shape_of(ours)
            shapes[hf_name] = shape if rule == "copy" else tuple(reversed(shape))
    return shapes


def _write_tokenizer(
    tmp: Path, tokenizer_files: Path, model_max_length: int, classifier: bool, chat_template: bool
) -> None:
    """GPT-2's tokenizer files into the folder: vocab.json, merges.txt and tokenizer_config.json."""
    shutil.copyfile(tokenizer_files / "encoder.json", tmp / "vocab.json")
    shutil.copyfile(tokenizer_files / "vocab.bpe", tmp / "merges.txt")
    tokenizer_config = _tokenizer_config(model_max_length, classifier)
    if chat_template and not classifier:
        tokenizer_config["chat_template"] = jinja_chat_template()
    _write_json(tmp / "tokenizer_config.json", tokenizer_config)


def _classifier_config(model_path: Path, config: GPTConfig, get) -> tuple[dict[str, Any], np.ndarray, int]:
    """config.json of GPT2ForSequenceClassification, the head bias folded into ln_f.bias (see the
    module docstring), and the length texts are cut to; or a WeightsError saying why not."""
    info = classifier_info(read_metadata(model_path), str(model_path))
    fold = fold_head_bias(get("out_head.weight"), get("out_head.bias"), str(model_path))
    labels = info.get("labels") or [str(i) for i in range(config.num_classes)]
    data = config_to_hf(config)
    data.update(
        {
            "architectures": ["GPT2ForSequenceClassification"],
            "num_labels": config.num_classes,
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
            "pad_token_id": EOT_ID,
        }
    )
    max_length = info.get("max_length") or config.context_length
    return data, fold, min(max_length, config.context_length)


def classifier_info(metadata: dict[str, str], source: str) -> dict[str, Any]:
    """The classifier's settings (the `gptcore_classifier` metadata of a weights or adapter file), checked
    to be what GPT2ForSequenceClassification computes: token_position last_non_pad with pad 50256.

    Raises:
        WeightsError: bad metadata, another token_position (`last` is the default where none is
            stored) or another pad id, in one line.
    """
    try:
        info = json.loads(metadata[CLASSIFIER_KEY]) if CLASSIFIER_KEY in metadata else {}
    except json.JSONDecodeError as err:
        raise WeightsError(f"{source}: bad {CLASSIFIER_KEY} metadata: {err}") from None
    position = info.get("token_position", "last")
    pad_id = info.get("pad_id", EOT_ID)
    if position != "last_non_pad":
        raise WeightsError(
            f"{source}: classifies at token_position {position!r} (the padded length's last position); "
            "GPT2ForSequenceClassification reads the last non-pad token, the same only for token_position "
            "last_non_pad: finetune with classifier.token_position: last_non_pad to export it"
        )
    if pad_id != EOT_ID:
        raise WeightsError(f"{source}: pads with token {pad_id}; the export needs pad 50256 (<|endoftext|>)")
    return info


def fold_head_bias(weight: np.ndarray, bias: np.ndarray, source: str) -> np.ndarray:
    """The shift d [C] of the final LayerNorm's bias that stands in for the head's bias b: weight @ d == b.

    weight [num_classes, C], bias [num_classes]; d = pinv(weight) b in float64, returned as float32
    (see the module docstring: transformers' `score` has no bias).

    Raises:
        WeightsError: the head's rows are linearly dependent, so no d exists for every b.
    """
    weight = np.asarray(weight, dtype=np.float64)  # [num_classes, C]
    if np.linalg.matrix_rank(weight) < weight.shape[0]:
        raise WeightsError(
            f"{source}: the head's rows are linearly dependent, so its bias cannot move "
            "into the final LayerNorm (GPT2ForSequenceClassification's head has no bias)"
        )
    fold = np.linalg.pinv(weight) @ np.asarray(bias, dtype=np.float64)  # [C]
    return fold.astype(np.float32)


def _tokenizer_config(model_max_length: int, pad: bool) -> dict[str, Any]:
    """GPT-2's tokenizer settings: `<|endoftext|>` as BOS/EOS/UNK (and pad for classifiers), no BOS added."""
    data = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
    }
    if pad:
        data["pad_token"] = ENDOFTEXT
        data["padding_side"] = "right"
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
