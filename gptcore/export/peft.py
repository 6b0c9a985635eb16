"""A gptcore LoRA adapter file -> a Hugging Face PEFT folder that `peft.PeftModel.from_pretrained` loads
onto the transformers export of its base (gptcore.export.hf): GPT2LMHeadModel, or
GPT2ForSequenceClassification(num_labels, pad_token_id=50256) for a classifier.

The folder holds `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM or SEQ_CLS, r, lora_alpha,
lora_dropout, target_modules, fan_in_fan_out, modules_to_save) and `adapter_model.safetensors`, names as
gptcore.convert.peft describes them. Choices:
- `target_modules` lists every adapted module by its full HF name ("transformer.h.0.attn.c_attn"):
  PEFT matches an entry when a module's name equals it or ends with "." + it, so full names keep
  attn.c_proj and mlp.c_proj apart, which gptcore's out_proj and proj are.
- `fan_in_fan_out` is true: GPT-2's Conv1D keeps its weight as [in, out]. An adapted untied head
  (lm_head) is an nn.Linear: PEFT warns, sets false for it and loads it correctly
  (`peft/tuners/lora/layer.py`, `dispatch_default`); A and B need no transpose either way.
- A classifier's head (out_head, trained whole) goes in `modules_to_save` as `score` (peft #577 was a
  head left unsaved). transformers' `score` has no bias, so the bias moves into the final LayerNorm
  as gptcore.export.hf does it (`fold_head_bias`): `transformer.ln_f` is saved too, with the base's
  (or the adapter's) weight and its bias shifted. The classifier must read its last non-pad token
  with pad 50256 (`classifier_info`), which the adapter's extra metadata records as a weights file does.
- `base_model_name_or_path` is what `AutoPeftModel*.from_pretrained(DIR)` loads the base from: pass
  the folder `gptcore export --format hf BASE` wrote; the default names the base by its digest,
  "gptcore-base-<first 12 hex digits>". `PeftModel.from_pretrained(model, DIR)` does not read it.
The adapter file's metadata and the exact values PEFT's copy changes ride along in the safetensors
metadata, so that `gptcore convert` brings back the same bytes (gptcore.convert.peft).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from gptcore.atomic import atomic_dir
from gptcore.convert.hf import RULES
from gptcore.convert.peft import (
    CONFIG_FILE,
    META_BASE,
    META_EXACT,
    META_EXTRA,
    META_FORMAT,
    META_LORA,
    META_TENSORS,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    hf_module,
    peft_key,
)
from gptcore.errors import WeightsError
from gptcore.export.hf import classifier_info, fold_head_bias
from gptcore.training.adapter_file import FORMAT, Adapter, read_adapter
from gptcore.training.lora import TARGETS
from gptcore.weights import write_safetensors

NORM = ("final_norm.weight", "final_norm.bias")


@dataclass(frozen=True)
class PeftExport:
    """What export_peft wrote."""

    path: Path
    task_type: str  # CAUSAL_LM or SEQ_CLS
    target_modules: list[str]
    modules_to_save: list[str] | None
    tensors: int


def export_peft(
    adapter_path: str | os.PathLike,
    out: str | os.PathLike,
    base_model_path: str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
) -> PeftExport:
    """Write the gptcore adapter file `adapter_path` as a PEFT folder `out` (swapped in atomically).

    base_model_path: the gptcore weights file the adapter was trained on; its digest must match. A
        classifier needs it (its final LayerNorm takes the head's bias); a language model does not.
    base_model_name_or_path: recorded in adapter_config.json (see the module docstring).

    Raises:
        WeightsError: one line: an unreadable adapter, a base of another digest, a classifier without
            its base or whose head cannot fold (token_position `last`, pad id, deficient rank, a head
            adapted with LoRA as well as trained whole), a tensor with no transformers name.
    """
    from gptcore.download import sha256_of

    adapter = read_adapter(adapter_path)
    digest = None if base_model_path is None else sha256_of(base_model_path)
    if digest is not None and digest != adapter.base_sha256:
        raise WeightsError(
            f"{adapter.source} was trained on base {adapter.base_sha256[:12]}, not {base_model_path} ({digest[:12]})"
        )
    classifier = "out_head.bias" in adapter.tensors  # a language model's head has no bias
    layers = sorted({name.rpartition(".")[0] for name in adapter.tensors if name.endswith(".lora_A")}, key=_order)
    if classifier and ("out_head" in layers or "out_head.weight" not in adapter.tensors):
        raise WeightsError(
            f"{adapter.source}: a classifier adapter exports with its head trained whole (out_head.weight and "
            "out_head.bias), not adapted with LoRA"
        )
    arrays, exact = _peft_tensors(adapter, classifier, base_model_path)
    targets = [hf_module(name, classifier) for name in layers]
    whole = [key for key in arrays if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    to_save = sorted({key.removeprefix(PEFT_PREFIX).rpartition(".")[0] for key in whole})  # HF module names
    data = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or f"gptcore-base-{adapter.base_sha256[:12]}",
        "r": adapter.config.rank,
        "lora_alpha": adapter.config.alpha,
        "lora_dropout": adapter.config.dropout,
        "target_modules": targets,
        "fan_in_fan_out": True,
        "bias": "none",
        "modules_to_save": to_save or None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    metadata = {
        "format": "pt",
        META_FORMAT: FORMAT,
        META_LORA: json.dumps(adapter.config.to_dict()),
        META_BASE: adapter.base_sha256,
        META_EXTRA: json.dumps(adapter.extra, sort_keys=True),
        META_TENSORS: json.dumps(sorted(adapter.tensors)),
        META_EXACT: json.dumps(exact, sort_keys=True),
    }
    shapes = {key: arrays[key].shape for key in sorted(arrays)}
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, shapes, arrays.__getitem__, metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return PeftExport(Path(out), data["task_type"], targets, data["modules_to_save"], len(arrays))


def _order(layer: str) -> tuple[int, int]:
    """Model order of a LoRA layer name: block by block, each in TARGETS order; the head last."""
    match = re.fullmatch(r"trf_blocks\.(\d+)\.\w+\.(\w+)", layer)
    if match is None:
        return (1 << 30, TARGETS.index(layer))
    return (int(match[1]), TARGETS.index(match[2]))


def _peft_tensors(
    adapter: Adapter, classifier: bool, base_model_path: str | os.PathLike | None
) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """The PEFT file's tensors by key, and the exact gptcore values of those it holds changed.

    A classifier's out_head.bias [num_classes] has no key of its own: it is folded into transformer.ln_f.bias,
    which is saved whole with the final LayerNorm's weight (from the adapter, else from the base).
    """
    arrays, exact = {}, {}
    for name, tensor in adapter.tensors.items():
        if name == "out_head.bias" and classifier:
            continue
        try:
            key, rule = peft_key(name, classifier)
        except KeyError:
            raise WeightsError(f"{adapter.source}: tensor {name} has no Hugging Face GPT-2 name") from None
        arrays[key] = RULES[rule].to_hf(tensor.float().numpy())
    if classifier:
        weight, bias = adapter.tensors["out_head.weight"], adapter.tensors["out_head.bias"]
        classifier_info(adapter.extra, adapter.source)  # raises unless last_non_pad with pad 50256
        fold = fold_head_bias(weight.numpy(), bias.numpy(), adapter.source)  # [C]
        norm = _final_norm(adapter, base_model_path)
        for name in NORM:
            arrays[peft_key(name, classifier)[0]] = norm[name]
        arrays[peft_key(NORM[1], classifier)[0]] = norm[NORM[1]] + fold
        exact = {name: adapter.tensors[name].tolist() for name in ("out_head.bias", NORM[1]) if name in adapter.tensors}
    return arrays, exact


def _final_norm(adapter: Adapter, base_model_path: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """The final LayerNorm's weight and bias [C] as float32: the adapter's where it trained them, else the base's."""
    if all(name in adapter.tensors for name in NORM):
        return {name: adapter.tensors[name].float().numpy() for name in NORM}
    if base_model_path is None:
        raise WeightsError(
            f"{adapter.source}: a classifier's head bias moves into the final LayerNorm (transformers' score "
            "has no bias): pass the base weights file"
        )
    with safe_open(str(base_model_path), framework="numpy") as f:
        base = {name: f.get_tensor(name).astype(np.float32) for name in NORM}
    return {name: adapter.tensors[name].float().numpy() if name in adapter.tensors else base[name] for name in NORM}
