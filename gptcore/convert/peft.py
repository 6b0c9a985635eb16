"""Hugging Face PEFT LoRA folders of GPT-2 and gptcore adapter files: the names between them, and the import.

A PEFT folder (`PeftModel.save_pretrained`, peft 0.21; `peft/utils/save_and_load.py`) holds
`adapter_config.json` and `adapter_model.safetensors`, whose keys are those `get_peft_model_state_dict`
gives for a PeftModel around GPT2LMHeadModel / GPT2ForSequenceClassification:
- `base_model.model.<HF module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], e.g.
  `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`. PEFT's LoRA `Linear` wraps GPT-2's
  `Conv1D` (weight [in, out]) with `fan_in_fan_out` and computes base(x) + lora_B(lora_A(dropout(x))) *
  (lora_alpha / r) (`peft/tuners/lora/layer.py`, `Linear.forward`): A and B are nn.Linear layers in
  both libraries, so gptcore's lora_A [r, in] and lora_B [out, r] are PEFT's without a transpose;
  `fan_in_fan_out` transposes only B A when merging it into a Conv1D weight.
- a module in `modules_to_save` (a classifier's `score`, `transformer.ln_f`) as its own tensors,
  `base_model.model.score.weight`.
- with `lm_head` targeted, peft also saves `base_model.model.lm_head.base_layer.weight`: a copy of the
  base's head (its `save_embedding_layers="auto"`); the import checks it against the base and drops it.

gptcore's export (gptcore.export.peft) adds safetensors metadata, which PEFT ignores: the adapter's
LoRA config, base digest and extra strings, its tensor names, and the exact values of tensors that the
PEFT file holds changed (a classifier's head bias, folded into ln_f). With it the import writes back
the same bytes. A folder that peft itself wrote has none of it: the import then needs the base weights
file (gptcore's conversion of the HF base), whose SHA-256 the adapter records and whose config checks
every name and shape; an adapter must cover every layer of each kind it adapts (gptcore's targets are
layer kinds: qkv, out_proj, fc, proj, out_head). `fan_in_fan_out` is accepted either way: the tensors'
layout does not depend on it, PEFT sets it per layer (True for every Conv1D, False for lm_head), and
its own save of GPT2LMHeadModel with lm_head targeted writes false (the config object is shared).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gptcore.config import GPTConfig
from gptcore.convert.hf import BLOCK_NAMES, EMBEDDING_NAMES, FINAL_NAMES, PREFIX, RULES
from gptcore.errors import ConfigError, WeightsError
from gptcore.model import GPTModel
from gptcore.tokenizer import EOT_ID
from gptcore.training.adapter_file import FORMAT, save_adapter
from gptcore.training.lora import TARGETS, LoRAConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CLASSIFIER_KEY = "gptcore_classifier"  # gptcore.recipes.classifier.METADATA_KEY (convert does not import recipes)
# safetensors metadata of gptcore's export: the adapter file's own metadata, under names of their own.
META_FORMAT, META_LORA, META_BASE = "gptcore_format", "gptcore_lora", "gptcore_base_sha256"
META_EXTRA, META_TENSORS, META_EXACT = "gptcore_extra", "gptcore_tensors", "gptcore_exact"
# LoraConfig options that change what the tensors mean (DoRA, rsLoRA's alpha / sqrt(r), per-layer ranks...).
UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
)
# Initialisations that also rewrite the base weights (PiSSA, OLoRA, LoftQ, CorDA keep a residual base).
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

_BLOCK = {ours: (hf, rule) for hf, ours, rule in BLOCK_NAMES}
_BLOCK_HF = {hf: (ours, rule) for hf, ours, rule in BLOCK_NAMES}
_TOP = {ours: (PREFIX + hf, rule) for hf, ours, rule in (*EMBEDDING_NAMES, *FINAL_NAMES)}
_TOP_HF = {PREFIX + hf: (ours, rule) for hf, ours, rule in (*EMBEDDING_NAMES, *FINAL_NAMES)}


def hf_tensor(ours: str, classifier: bool) -> tuple[str, str]:
    """A gptcore tensor name -> (its name in GPT2LMHeadModel, or GPT2ForSequenceClassification where
    `classifier`, and the gptcore.convert.hf rule: `conv` transposes). KeyError for a name it lacks."""
    if ours.startswith("out_head."):
        return ("score." if classifier else "lm_head.") + ours.removeprefix("out_head."), "copy"
    match = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", ours)
    if match and match[2] in _BLOCK:
        hf, rule = _BLOCK[match[2]]
        return f"{PREFIX}h.{match[1]}.{hf}", rule
    return _TOP[ours]


def gptcore_tensor(hf: str) -> tuple[str, str]:
    """The inverse of hf_tensor: an HF tensor name -> (gptcore name, rule). KeyError for one it lacks."""
    head, _, rest = hf.partition(".")
    if head in ("lm_head", "score"):
        return f"out_head.{rest}", "copy"
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", hf)
    if match and match[2] in _BLOCK_HF:
        ours, rule = _BLOCK_HF[match[2]]
        return f"trf_blocks.{match[1]}.{ours}", rule
    return _TOP_HF[hf]


def hf_module(ours: str, classifier: bool) -> str:
    """A gptcore Linear's name ("trf_blocks.0.att.qkv") -> the HF module's ("transformer.h.0.attn.c_attn")."""
    return hf_tensor(ours + ".weight", classifier)[0].removesuffix(".weight")


def peft_key(ours: str, classifier: bool) -> tuple[str, str]:
    """A gptcore adapter tensor name -> (its key in adapter_model.safetensors, rule)."""
    module, _, param = ours.rpartition(".")
    if param in ("lora_A", "lora_B"):
        return f"{PEFT_PREFIX}{hf_module(module, classifier)}.{param}.weight", "copy"
    hf, rule = hf_tensor(ours, classifier)
    return PEFT_PREFIX + hf, rule


@dataclass(frozen=True)
class PeftImport:
    """What convert_peft_folder wrote."""

    config: LoRAConfig
    tensors: int
    base_sha256: str
    foreign: bool  # written by peft itself, not by gptcore's export


def is_peft_folder(folder: str | os.PathLike) -> bool:
    """True when `folder` is a PEFT adapter folder (it holds adapter_config.json)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def convert_peft_folder(
    folder: str | os.PathLike, out: str | os.PathLike, base_model_path: str | os.PathLike | None = None
) -> PeftImport:
    """Import a PEFT GPT-2 LoRA folder as a gptcore adapter file `out`, written atomically.

    A folder from gptcore's export comes back bit-identical (`base_model_path`, if given, must be the
    base it names). A folder that peft wrote needs `base_model_path`: the gptcore weights file of its
    base (`gptcore convert` of the HF model), whose digest the adapter records (see the module docstring).

    Raises:
        WeightsError: one line naming what cannot be mapped: a missing or unreadable file, another peft
            type or option, a target gptcore has no layer for or one that covers only some layers of its
            kind, a rank or shape that disagrees, a base whose digest or config does not fit.
    """
    from gptcore.download import sha256_of

    folder = Path(folder)
    data = _read_config(folder)
    tensors, metadata = _read_weights(folder / WEIGHTS_FILE)
    foreign = metadata.get(META_FORMAT) != FORMAT
    if not foreign:
        config, ours, digest, extra = _from_gptcore(data, tensors, metadata, str(folder))
        if base_model_path is not None and sha256_of(base_model_path) != digest:
            raise WeightsError(f"{folder}: the adapter was trained on base {digest[:12]}, not {base_model_path}")
    elif base_model_path is None:
        raise WeightsError(
            f"{folder}: written by peft, not gptcore: pass the base weights file (gptcore convert of its "
            "base model) so that the adapter records the base's digest"
        )
    else:
        config, ours, extra = _from_peft(data, tensors, Path(base_model_path), str(folder))
        digest = sha256_of(base_model_path)
    save_adapter(out, ours, config, digest, extra)
    return PeftImport(config=config, tensors=len(ours), base_sha256=digest, foreign=foreign)


def _classifier_extra(num_classes: int) -> dict[str, str]:
    """gptcore's ClassifierInfo of a GPT2ForSequenceClassification (the last non-pad token, pad 50256), as
    the adapter's extra metadata."""
    info = {"labels": [str(i) for i in range(num_classes)], "max_length": None}
    return {CLASSIFIER_KEY: json.dumps({**info, "token_position": "last_non_pad", "pad_id": EOT_ID})}


def _read_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, checked to be a LoRA of a kind gptcore computes (one-line WeightsError)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{folder}: not a PEFT folder ({CONFIG_FILE} not found)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not valid JSON: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    if data.get("peft_type") != "LORA":
        raise WeightsError(f"{path}: peft_type {data.get('peft_type')!r}; gptcore imports LoRA adapters only")
    if data.get("task_type") not in (None, "CAUSAL_LM", "SEQ_CLS"):
        raise WeightsError(f"{path}: task_type {data['task_type']!r}; gptcore imports CAUSAL_LM and SEQ_CLS")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise WeightsError(
            f"{path}: init_lora_weights {init!r} changes the base weights; gptcore adapts the base as is"
        )
    used = [key for key in UNSUPPORTED if data.get(key)]
    if used or data.get("bias", "none") != "none":
        what = f"{used[0]} {data[used[0]]!r}" if used else f"bias {data['bias']!r}"
        raise WeightsError(f"{path}: {what}; gptcore's LoRA has no such option")
    return data


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (as float32) and metadata of adapter_model.safetensors."""
    if not path.is_file():
        raise WeightsError(f"{path}: not found (gptcore reads PEFT's safetensors weights only)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).float() for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file: {' '.join(str(err).split())}") from None
    return tensors, metadata


def _from_gptcore(
    data: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[LoRAConfig, dict[str, torch.Tensor], str, dict[str, str]]:
    """The adapter gptcore's export wrote: its config, tensors, base digest and extra from the metadata."""
    try:
        config = LoRAConfig.from_dict(json.loads(metadata[META_LORA]))
        names, exact = json.loads(metadata[META_TENSORS]), json.loads(metadata[META_EXACT])
        extra, digest = json.loads(metadata[META_EXTRA]), metadata[META_BASE]
    except (KeyError, ValueError, ConfigError) as err:
        raise WeightsError(f"{source}: bad gptcore metadata in {WEIGHTS_FILE}: {' '.join(str(err).split())}") from None
    classifier = data.get("task_type") == "SEQ_CLS"
    ours = {}
    for name in names:
        if name in exact:
            ours[name] = torch.tensor(exact[name], dtype=torch.float32)
            continue
        key, rule = peft_key(name, classifier)
        if key not in tensors:
            raise WeightsError(f"{source}: {WEIGHTS_FILE} lacks {key}")
        ours[name] = torch.from_numpy(np.ascontiguousarray(RULES[rule].to_gptcore(tensors[key].numpy())))
    return config, ours, digest, extra


def _from_peft(
    data: dict[str, Any], tensors: dict[str, torch.Tensor], base: Path, source: str
) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, str]]:
    """A folder peft wrote: (config, tensors, extra metadata), names mapped back and checked against the
    base (see the module docstring)."""
    from gptcore.weights import read_config

    lora, whole, copies = _split(tensors, source)
    classifier = PEFT_PREFIX + "score.weight" in tensors
    if data.get("task_type") == "SEQ_CLS" and not classifier:
        raise WeightsError(f"{source}: a SEQ_CLS adapter without its score head (peft #577); gptcore cannot use it")
    base_config, extra = read_config(base), {}
    if classifier:
        base_config = dataclasses.replace(base_config, num_classes=whole["out_head.weight"].shape[0])
        whole["out_head.bias"] = torch.zeros(base_config.num_classes)  # transformers' score has no bias
        extra = _classifier_extra(base_config.num_classes)
    try:
        targets = tuple(t for t in TARGETS if any(name.rsplit(".", 1)[-1] == t for name in lora))
        config = LoRAConfig(
            rank=data.get("r"), alpha=data.get("lora_alpha"), dropout=data.get("lora_dropout", 0.0), targets=targets
        )
    except ConfigError as err:
        raise WeightsError(f"{source}: {err}") from None
    _check_against_base(config, lora, base_config, source)
    _check_copies(copies, base, source)
    ours = {f"{name}.{param}": tensor for name, pair in lora.items() for param, tensor in pair.items()}
    return config, {**ours, **whole}, extra


def _split(
    tensors: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PEFT keys -> ({gptcore Linear: {lora_A, lora_B}}, {gptcore tensor: whole tensor}, {base copies})."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole, copies = {}, {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        name = key.removeprefix(PEFT_PREFIX)
        try:
            if match:
                module = gptcore_tensor(match[1] + ".weight")[0].removesuffix(".weight")
                if module.rsplit(".", 1)[-1] not in TARGETS:
                    raise KeyError(module)
                lora.setdefault(module, {})[f"lora_{match[2]}"] = tensor
            elif name.endswith(".base_layer.weight"):
                copies[gptcore_tensor(name.replace(".base_layer", ""))[0]] = tensor
            else:
                ours, rule = gptcore_tensor(name)
                whole[ours] = torch.from_numpy(np.ascontiguousarray(RULES[rule].to_gptcore(tensor.numpy())))
        except KeyError:
            raise WeightsError(f"{source}: {key} names no layer of gptcore's GPT-2 that it can adapt") from None
    if not lora:
        raise WeightsError(f"{source}: no LoRA tensors (lora_A / lora_B) in {WEIGHTS_FILE}")
    return lora, whole, copies


def _check_against_base(
    config: LoRAConfig, lora: dict[str, dict[str, torch.Tensor]], base_config: GPTConfig, source: str
) -> None:
    """Every layer of each adapted kind has A [r, in] and B [out, r] (one-line WeightsError otherwise)."""
    with torch.device("meta"):
        model = GPTModel(base_config)
    if "out_head" in config.targets and base_config.tie_embeddings and base_config.num_classes is None:
        raise WeightsError(f"{source}: adapts lm_head, which the base ties to wte; gptcore adapts untied heads only")
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }
    for name in layers:
        if name.rsplit(".", 1)[-1] in config.targets and name not in lora:
            raise WeightsError(
                f"{source}: adapts some {name.rsplit('.', 1)[-1]} layers but not {name}; gptcore adapts every "
                "layer of a kind"
            )
    for name, pair in lora.items():
        if name not in layers or set(pair) != {"lora_A", "lora_B"}:
            raise WeightsError(f"{source}: {name} is not a layer of the base, or lacks lora_A or lora_B")
        a, b, linear = pair["lora_A"], pair["lora_B"], layers[name]
        if a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise WeightsError(
                f"{source}: {name} has rank {a.shape[0]}/{b.shape[1]}, adapter_config.json says r = {config.rank}"
            )
        if tuple(a.shape) != (config.rank, linear.in_features) or tuple(b.shape) != (linear.out_features, config.rank):
            raise WeightsError(
                f"{source}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not "
                f"{(config.rank, linear.in_features)} and {(linear.out_features, config.rank)}: another base"
            )


def _check_copies(copies: dict[str, torch.Tensor], base: Path, source: str) -> None:
    """The base weights peft saved beside the adapter (a targeted lm_head's) must be the base's own."""
    with safe_open(str(base), framework="pt") as f:
        stored = set(f.keys())
        for name, tensor in copies.items():
            if name not in stored or not torch.equal(f.get_tensor(name).float(), tensor):
                raise WeightsError(f"{source}: its copy of the base's {name} differs from {base}'s")
            logger.info("%s: dropped the copy of the base's %s that peft saves beside the adapter", source, name)
