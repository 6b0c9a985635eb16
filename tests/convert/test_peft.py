"""Hugging Face PEFT interop: our adapter through `peft.PeftModel` on the transformers export of its base
gives our logits (a language model, tied and untied, and a classifier); the folder imports back to the
same bytes; a folder peft itself wrote imports onto our base; what cannot be mapped is one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptcore.config import GPTConfig
from gptcore.convert.peft import convert_peft_folder, is_peft_folder
from gptcore.download import sha256_of
from gptcore.errors import WeightsError
from gptcore.export.hf import export_hf
from gptcore.export.peft import export_peft
from gptcore.model import random_model
from gptcore.tokenizer import EOT_ID
from gptcore.training.adapter_file import apply_adapter, read_adapter, save_adapter
from gptcore.training.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora
from gptcore.weights import load_model, load_state, save_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BODY = ("qkv", "out_proj", "fc", "proj")


def _config(tie: bool) -> GPTConfig:
    return GPTConfig(
        vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True, tie_embeddings=tie
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"tied": (weights file, HF export folder), "untied": ...}: random GPT-2-shaped bases, biases non-zero."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, tie in (("tied", True), ("untied", False)):
        torch.manual_seed(0)
        model = random_model(_config(tie), init="pytorch")
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("bias"):
                    param.normal_(0.0, 0.2)
        save_model(model, root / f"{name}.safetensors")
        export_hf(root / f"{name}.safetensors", root / f"{name}-hf")
        out[name] = (root / f"{name}.safetensors", root / f"{name}-hf")
    return out


def _adapt(model, lora: LoRAConfig, seed: int = 1):
    """Apply LoRA with A and B both random and non-zero (seeded), as a trained adapter has them."""
    torch.manual_seed(seed)
    apply_lora(model, lora)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0.0, 0.5)
    return model.eval()


def _tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(3))


def _one_line(call, *words):
    with pytest.raises(WeightsError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize(
    "base, lora",
    [
        ("tied", LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=BODY)),
        ("untied", LoRAConfig(rank=3, alpha=5.0)),  # every Linear, lm_head (an nn.Linear in HF) too
    ],
)
def test_peft_gives_our_logits_and_imports_back_bit_identically(bases, base, lora, tmp_path):
    base_path, hf_dir = bases[base]
    model = _adapt(load_model(base_path), lora)
    save_adapter(tmp_path / "a.safetensors", adapter_state_dict(model), lora, sha256_of(base_path), {"stage": "x"})
    result = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    assert is_peft_folder(tmp_path / "peft") and result.task_type == "CAUSAL_LM" and result.modules_to_save is None
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    expected = [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert result.target_modules == expected + (["lm_head"] if "out_head" in lora.targets else [])
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in keys and len(keys) == 2 * len(expected) + (
        2 if base == "untied" else 0
    )

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    idx = _tokens()
    with torch.no_grad():
        diff = (model(idx) - theirs(idx).logits).abs().max().item()
        moved = (model(idx) - load_model(base_path)(idx)).abs().max().item()
    assert diff < 1e-4 and moved > 1e-2, (diff, moved)

    info = convert_peft_folder(tmp_path / "peft", tmp_path / "back.safetensors")
    assert not info.foreign and info.config == lora
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def _classifier(base_path, token_position: str = "last_non_pad"):
    """A LoRA classifier as the finetuning stage makes one: a new head trained whole, LoRA on the body."""
    from gptcore.recipes.classifier import ClassifierInfo, build_classifier

    config, state = load_state(base_path)
    model = _adapt(build_classifier(config, state, num_classes=2, seed=7), LoRAConfig(rank=4, alpha=4.0, targets=BODY))
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([0.7, -1.3]))  # HF's score has no bias: it moves into ln_f
    extra = ClassifierInfo(max_length=16, token_position=token_position).to_metadata()
    return model, adapter_state_dict(model, also=["out_head"]), extra


def test_a_classifier_loads_as_sequence_classification_with_its_head(bases, tmp_path, tokenizer):
    from gptcore.data.sms import encode_texts, pad_ids
    from gptcore.recipes.classifier import class_logits

    base_path, hf_dir = bases["tied"]
    model, tensors, extra = _classifier(base_path)
    save_adapter(
        tmp_path / "a.safetensors", tensors, LoRAConfig(rank=4, alpha=4.0, targets=BODY), sha256_of(base_path), extra
    )
    _one_line(lambda: export_peft(tmp_path / "a.safetensors", tmp_path / "peft"), "pass the base weights file")
    result = export_peft(tmp_path / "a.safetensors", tmp_path / "peft", base_path)
    assert result.task_type == "SEQ_CLS" and result.modules_to_save == ["score", "transformer.ln_f"]
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert {"base_model.model.score.weight", "base_model.model.transformer.ln_f.bias"} <= set(f.keys())

    hf = transformers.GPT2ForSequenceClassification.from_pretrained(
        hf_dir, num_labels=2, pad_token_id=EOT_ID, local_files_only=True
    )
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    inputs = pad_ids(encode_texts(tokenizer, ["WINNER!! Claim your prize now", "see you at 7?", "ok"]), 16)
    assert (inputs == EOT_ID).any(dim=1).all()  # unequal lengths, right-padded with 50256
    with torch.no_grad():
        diff = (class_logits(model, inputs, "last_non_pad") - theirs(inputs).logits).abs().max().item()
    assert diff < 1e-4, diff

    convert_peft_folder(tmp_path / "peft", tmp_path / "back.safetensors", base_path)
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def _peft_written(hf_model, target_modules, out, task_type="CAUSAL_LM", **options):
    """An adapter trained with peft itself (B random, as after training), saved by save_pretrained."""
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type=task_type, **options)
    model = peft.get_peft_model(hf_model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return model.eval()


def test_an_adapter_peft_wrote_imports_onto_our_base(bases, tmp_path):
    base_path, hf_dir = bases["untied"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)
    theirs = _peft_written(hf, ["c_attn", "c_proj", "c_fc", "lm_head"], tmp_path / "peft")
    # peft's shared config object ends with lm_head's (an nn.Linear's) setting; the Conv1D layers used true.
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    _one_line(lambda: convert_peft_folder(tmp_path / "peft", tmp_path / "a.safetensors"), "pass the base weights file")
    info = convert_peft_folder(tmp_path / "peft", tmp_path / "a.safetensors", base_path)
    assert info.foreign and info.config == LoRAConfig(
        rank=4, alpha=8, targets=("qkv", "out_proj", "fc", "proj", "out_head")
    )
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.base_sha256 == sha256_of(base_path)
    ours = apply_adapter(load_model(base_path).eval(), adapter, sha256_of(base_path))
    idx = _tokens()
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() < 1e-4


def test_a_classifier_peft_wrote_imports_with_a_zero_head_bias(bases, tmp_path, tokenizer):
    from gptcore.data.sms import encode_texts, pad_ids
    from gptcore.recipes.classifier import build_classifier, class_logits

    base_path, hf_dir = bases["tied"]
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(
        hf_dir, num_labels=2, pad_token_id=EOT_ID, local_files_only=True
    )
    theirs = _peft_written(hf, ["c_attn", "c_fc"], tmp_path / "peft", task_type="SEQ_CLS")
    convert_peft_folder(tmp_path / "peft", tmp_path / "a.safetensors", base_path)
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert torch.equal(adapter.tensors["out_head.bias"], torch.zeros(2))
    assert json.loads(adapter.extra["gptcore_classifier"])["token_position"] == "last_non_pad"
    config, state = load_state(base_path)
    ours = apply_adapter(build_classifier(config, state, num_classes=2).eval(), adapter, sha256_of(base_path))
    inputs = pad_ids(encode_texts(tokenizer, ["a longer text than the next", "short"]), 12)
    with torch.no_grad():
        assert (class_logits(ours, inputs, "last_non_pad") - theirs(inputs).logits).abs().max().item() < 1e-4


def _edited(folder, config_change=None, tensors_change=None):
    if config_change:
        path = folder / "adapter_config.json"
        data = json.loads(path.read_text())
        config_change(data)
        path.write_text(json.dumps(data))
    if tensors_change:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        tensors_change(tensors)
        save_file(tensors, path)


def _rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


@pytest.mark.parametrize(
    "config_change, tensors_change, words",
    [
        (lambda d: d.update(peft_type="IA3"), None, ["peft_type 'IA3'", "LoRA"]),
        (lambda d: d.update(use_dora=True), None, ["use_dora"]),
        (lambda d: d.update(init_lora_weights="pissa_niter_4"), None, ["pissa_niter_4", "changes the base"]),
        (lambda d: d.update(r=8), None, ["trf_blocks.0.att.qkv has rank 4/4", "r = 8"]),
        (
            None,
            lambda t: _rename(
                t, *(f"base_model.model.transformer.h.0.{m}.lora_A.weight" for m in ("attn.c_attn", "ln_1"))
            ),
            ["transformer.h.0.ln_1.lora_A.weight", "names no layer"],
        ),
        (
            None,
            lambda t: [t.pop(f"base_model.model.transformer.h.1.attn.c_attn.lora_{p}.weight") for p in "AB"],
            ["adapts some qkv layers but not trf_blocks.1.att.qkv"],
        ),
    ],
)
def test_a_foreign_folder_that_cannot_be_mapped_is_one_line(bases, tmp_path, config_change, tensors_change, words):
    base_path, hf_dir = bases["tied"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)
    _peft_written(hf, ["c_attn"], tmp_path / "peft")
    _edited(tmp_path / "peft", config_change, tensors_change)
    _one_line(lambda: convert_peft_folder(tmp_path / "peft", tmp_path / "a.safetensors", base_path), *words)
    assert not (tmp_path / "a.safetensors").exists()


def test_an_export_that_cannot_be_made_is_one_line(bases, tmp_path):
    base_path, _ = bases["tied"]
    other_path, _ = bases["untied"]
    _, tensors, extra = _classifier(base_path, token_position="last")
    lora = LoRAConfig(rank=4, alpha=4.0, targets=BODY)
    save_adapter(tmp_path / "last.safetensors", tensors, lora, sha256_of(base_path), extra)
    _one_line(lambda: export_peft(tmp_path / "last.safetensors", tmp_path / "peft", base_path), "last_non_pad")
    _one_line(
        lambda: export_peft(tmp_path / "last.safetensors", tmp_path / "peft", other_path),
        "trained on base",
        sha256_of(base_path)[:12],
    )
    headless = {k: v for k, v in tensors.items() if k != "out_head.weight"}
    save_adapter(tmp_path / "headless.safetensors", headless, lora, sha256_of(base_path), extra)
    _one_line(lambda: export_peft(tmp_path / "headless.safetensors", tmp_path / "peft", base_path), "trained whole")
    _one_line(lambda: export_peft(base_path, tmp_path / "peft"), "not a gptcore LoRA adapter")
    assert not (tmp_path / "peft").exists()
