"""Hugging Face transformers in both directions: `gptcore export --format hf` and `gptcore convert HF_DIR`.

Checked against transformers itself: its GPT2LMHeadModel / GPT2ForSequenceClassification loaded from
the exported folder (offline) gives our logits and greedy tokens; its tokenizer our token ids; and a
folder it saved converts into a gptcore file with its logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gptcore.cli import main
from gptcore.config import GPTConfig
from gptcore.convert.hf import convert_hf_folder
from gptcore.errors import WeightsError
from gptcore.export.hf import export_hf
from gptcore.inference.decoding import generate
from gptcore.model import random_model
from gptcore.serve.chat import render_chat
from gptcore.tokenizer import EOT_ID, encode
from gptcore.weights import load_model, load_state, save_model
from tests.test_tokenizer import TEXTS
from tests.tf_checkpoints import hf_model

CHATS = [
    [{"role": "user", "content": "Name three primary colours."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2"},
    ],
]

transformers = pytest.importorskip("transformers")

# Stage 1's shape (no q/k/v bias, untied head, dropout) and GPT-2's (biases, tied) with an odd head count.
CONFIGS = {
    "stage1": GPTConfig(
        context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=False, tie_embeddings=False
    ),
    "gpt2_odd_heads": GPTConfig(
        context_length=16, emb_dim=48, n_heads=3, n_layers=2, qkv_bias=True, tie_embeddings=True
    ),
}


def _random_file(path, config: GPTConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = random_model(config, init="pytorch")  # large random weights: every tensor moves the logits
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)  # pytorch init keeps LayerNorm biases zero; make them count
    save_model(model, path)
    return load_model(path)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_loads_the_export_and_agrees(name, tmp_path, tokenizer):
    ours = _random_file(tmp_path / "m.safetensors", CONFIGS[name])
    args = ["export", "--format", "hf", "--chat-template", str(tmp_path / "m.safetensors"), str(tmp_path / "hf")]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.json",
    ]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.tie_word_embeddings == CONFIGS[name].tie_embeddings
    idx = torch.randint(0, 50257, (3, CONFIGS[name].context_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.3g}"

    prompt = torch.tensor([encode(tokenizer, "Every effort moves you")])
    mine = generate(ours, prompt, 8, eos_id=EOT_ID)[0].tolist()
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=EOT_ID)[0].tolist()
    if theirs[-1] == EOT_ID and len(theirs) > len(mine):  # transformers keeps the EOS it stopped at
        theirs = theirs[:-1]
    assert mine == theirs

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == encode(tokenizer, text), text
    for messages in CHATS:  # the Alpaca chat template, as gptcore serve renders chats
        rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == render_chat(messages)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_bit_identical(name, tmp_path):
    _random_file(tmp_path / "m.safetensors", CONFIGS[name])
    export_hf(tmp_path / "m.safetensors", tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.safetensors")]) == 0
    config, state = load_state(tmp_path / "m.safetensors")
    config_back, state_back = load_state(tmp_path / "back.safetensors")
    assert config_back == config
    assert sorted(state_back) == sorted(state)
    for key in state:
        assert torch.equal(state_back[key], state[key]), key


def _hf_logits_equal_ours(reference, out, n_vocab: int, n_ctx: int) -> None:
    ours = load_model(out)
    idx = torch.randint(0, n_vocab, (2, n_ctx), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(idx) - reference(idx).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.3g}"


def test_import_of_a_save_pretrained_folder(tmp_path, capsys):
    hparams = dict(n_vocab=50257, n_ctx=12, n_embd=24, n_head=3, n_layer=2)
    reference = hf_model(hparams, seed=3)
    reference.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors")]) == 0
    assert "converted" in capsys.readouterr().out
    _hf_logits_equal_ours(reference, tmp_path / "m.safetensors", 50257, 12)
    assert load_model(tmp_path / "m.safetensors").config.qkv_bias  # HF's GPT-2 has q/k/v biases


def test_import_of_a_pytorch_model_bin_without_prefix(tmp_path):
    """The layout of old Hub uploads: GPT2Model names (no `transformer.`), the attention mask buffers,
    pytorch_model.bin; read with weights_only=True."""
    hparams = dict(n_vocab=50257, n_ctx=10, n_embd=16, n_head=2, n_layer=1)
    reference = hf_model(hparams, seed=4)
    state = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 10, 10))  # the causal-mask buffer, not a weight
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    reference.config.to_json_file(tmp_path / "hf" / "config.json")
    convert_hf_folder(tmp_path / "hf", tmp_path / "m.safetensors")
    _hf_logits_equal_ours(reference, tmp_path / "m.safetensors", 50257, 10)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda c, s: c.update(model_type="llama"), "model_type"),
        (lambda c, s: c.update(activation_function="relu"), "activation_function"),
        (lambda c, s: s.pop("transformer.h.0.mlp.c_fc.bias"), "h.0.mlp.c_fc.bias missing"),
        (lambda c, s: s.update({"transformer.extra.weight": torch.zeros(2)}), "unexpected tensor extra.weight"),
        (lambda c, s: s.update({"transformer.wpe.weight": torch.zeros(11, 16)}), r"wpe.weight has shape \[11, 16\]"),
    ],
)
def test_import_refuses_what_it_cannot_run(tmp_path, change, pattern):
    reference = hf_model(dict(n_vocab=50257, n_ctx=10, n_embd=16, n_head=2, n_layer=1), seed=5)
    config = reference.config.to_dict()
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    change(config, state)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=pattern):
        convert_hf_folder(tmp_path / "hf", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_import_refuses_a_foreign_vocabulary(tmp_path, tokenizer):
    reference = hf_model(dict(n_vocab=50257, n_ctx=8, n_embd=16, n_head=2, n_layer=1), seed=8)
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(WeightsError, match="vocab.json: not GPT-2's encoder.json"):
        convert_hf_folder(tmp_path / "hf", tmp_path / "m.safetensors")


def _classifier(tmp_path, token_position: str):
    from gptcore.recipes.classifier import ClassifierInfo, build_classifier, save_classifier

    config = CONFIGS["gpt2_odd_heads"]
    torch.manual_seed(6)
    body = random_model(config, init="pytorch").state_dict()
    model = build_classifier(config, body, num_classes=2, seed=7).eval()
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([0.7, -1.3]))  # a trained head has a bias; HF's score has none
    save_classifier(model, ClassifierInfo(max_length=12, token_position=token_position), tmp_path / "c.safetensors")
    return model


def test_classifier_exports_as_sequence_classification(tmp_path, tokenizer):
    from gptcore.data.sms import encode_texts, pad_ids
    from gptcore.recipes.classifier import class_logits

    model = _classifier(tmp_path, "last_non_pad")
    result = export_hf(tmp_path / "c.safetensors", tmp_path / "hf")
    assert result.architecture == "GPT2ForSequenceClassification"
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.pad_token_id == EOT_ID and hf.config.id2label == {0: "ham", 1: "spam"}
    texts = ["WINNER!! Claim your prize now", "see you at 7?", "ok"]
    inputs = pad_ids(encode_texts(tokenizer, texts), 12)  # right-padded with 50256, as gptcore classifies
    with torch.no_grad():
        ours = class_logits(model, inputs, "last_non_pad")
        theirs = hf(inputs).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    batch = hf_tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")  # model_max_length 12
    assert torch.equal(batch["input_ids"], inputs)


def test_classifier_reading_the_last_position_is_refused(tmp_path, capsys):
    _classifier(tmp_path, "last")
    assert main(["export", "--format", "hf", str(tmp_path / "c.safetensors"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "last_non_pad" in err
    assert not (tmp_path / "hf").exists()


def test_generate_on_a_transformers_folder_says_how_to_convert(tmp_path, capsys):
    hf_model(dict(n_vocab=50257, n_ctx=8, n_embd=16, n_head=2, n_layer=1)).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress bar
    assert main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Hugging Face folder: convert it with `gptcore convert`" in err
