"""OpenAI TF checkpoint -> gptcore: parity with Hugging Face's GPT2LMHeadModel on checkpoints that
TensorFlow itself writes in OpenAI's layout, the test's own power, and every way a checkpoint can be bad."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptcore.cli import main as cli_main
from gptcore.convert import openai
from gptcore.convert.openai import Rule, convert_checkpoint, read_hparams
from gptcore.convert.openai_download import CHECKPOINT_FILES
from gptcore.errors import WeightsError
from gptcore.inference.decoding import generate
from gptcore.model import GPTModel, set_fused_attention
from gptcore.weights import load_model, load_state, save_model, save_streaming
from tests.tf_checkpoints import hf_model, openai_arrays, openai_shapes, write_checkpoint

SHAPES = {  # name -> hparams: an odd head count, a short context, the real vocabulary (for generation)
    "odd_heads": dict(n_vocab=97, n_ctx=16, n_embd=24, n_head=3, n_layer=2),
    "short_ctx": dict(n_vocab=61, n_ctx=5, n_embd=16, n_head=4, n_layer=1),
    "gpt2_vocab": dict(n_vocab=50257, n_ctx=40, n_embd=16, n_head=2, n_layer=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mirror_dir):
    """name -> (checkpoint folder, the HF model it holds, converted weights file); written once."""
    root = tmp_path_factory.mktemp("openai")
    made = {}
    for seed, (name, hparams) in enumerate(SHAPES.items()):
        reference = hf_model(hparams, seed=seed)
        folder = write_checkpoint(
            root / name, hparams, openai_arrays(reference, hparams["n_layer"]), mirror_dir / "gpt2"
        )
        out = root / f"{name}.safetensors"
        convert_checkpoint(folder, out)
        made[name] = (folder, reference, out)
    return made


def max_logit_diff(ours, reference, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(idx) - reference(idx).logits).abs().max().item()


def assert_parity(ours, reference, hparams: dict, seed: int = 0) -> None:
    """Our logits equal HF's (fp32, max abs diff < 1e-4) on random tokens, at full and partial length."""
    generator = torch.Generator().manual_seed(seed)
    for length in (hparams["n_ctx"], max(1, hparams["n_ctx"] // 2)):
        idx = torch.randint(0, hparams["n_vocab"], (3, length), generator=generator)
        diff = max_logit_diff(ours, reference, idx)
        assert diff < 1e-4, f"max |logit diff| {diff:.3g} at length {length}"


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("fused", [True, False])
def test_logits_equal_hugging_face(checkpoints, name, fused):
    _, reference, out = checkpoints[name]
    ours = load_model(out)
    set_fused_attention(ours, fused)
    assert ours.config.to_dict() == dict(
        vocab_size=SHAPES[name]["n_vocab"],
        context_length=SHAPES[name]["n_ctx"],
        emb_dim=SHAPES[name]["n_embd"],
        n_heads=SHAPES[name]["n_head"],
        n_layers=SHAPES[name]["n_layer"],
        drop_rate=0.0,
        qkv_bias=True,
        tie_embeddings=True,
        num_classes=None,
    )
    with torch.no_grad():
        assert reference(torch.zeros(1, 2, dtype=torch.long)).logits.abs().max() > 0.5  # not a trivial model
    assert_parity(ours, reference, SHAPES[name])


def test_head_is_tied_and_stored_once(checkpoints):
    _, reference, out = checkpoints["odd_heads"]
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        wte = f.get_tensor("tok_emb.weight")
    assert "out_head.weight" not in keys and len(keys) == len(openai.name_table(2))
    assert torch.equal(wte, reference.transformer.wte.weight.detach())
    ours = load_model(out)
    assert ours.out_head.weight.data_ptr() == ours.tok_emb.weight.data_ptr()


def hf_greedy(reference, idx: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            nxt = reference(idx).logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def hf_continuation(checkpoints, tokenizer) -> torch.Tensor:
    """HF's greedy continuation of PROMPT by the gpt2_vocab model: [1, T + 20] token ids."""
    _, reference, _ = checkpoints["gpt2_vocab"]
    expected = hf_greedy(reference, torch.tensor([tokenizer.encode(PROMPT)]), 20)
    assert 50256 not in expected[0].tolist()  # no end-of-text: generation runs its full length
    return expected


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hugging_face(checkpoints, tokenizer, hf_continuation, use_cache):
    ours = load_model(checkpoints["gpt2_vocab"][2])
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    got = generate(ours, idx, 20, temperature=0.0, use_cache=use_cache)
    assert got.tolist() == hf_continuation.tolist()
    assert len(set(hf_continuation[0, idx.shape[1] :].tolist())) > 3  # a non-degenerate continuation


def test_cli_convert_then_generate(checkpoints, tokenizer, hf_continuation, tmp_path, capsys):
    folder = checkpoints["gpt2_vocab"][0]
    out = tmp_path / "model.safetensors"
    assert cli_main(["convert", str(folder), str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    assert (
        cli_main(["generate", "--model", str(out), "--prompt", PROMPT, "--max-new-tokens", "20", "--device", "cpu"])
        == 0
    )
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode(hf_continuation[0].tolist())


def swap_qk(a: np.ndarray) -> np.ndarray:
    q, k, v = np.split(a, 3, axis=0)
    return np.concatenate([k, q, v])


def with_block_rule(target: str, rule: str):
    return tuple((s, t, rule if t == target else r) for s, t, r in openai.BLOCK_NAMES)


MISMAPS = {  # a deliberately wrong name table must break parity, or the parity test is blind
    "q_k_swapped": lambda: with_block_rule("att.qkv.weight", "conv_qk_swapped"),
    "c_proj_not_transposed": lambda: with_block_rule("att.out_proj.weight", "conv_no_transpose"),
    "ln_1_ln_2_swapped": lambda: tuple(
        (s.replace("ln_1", "LN").replace("ln_2", "ln_1").replace("LN", "ln_2"), t, r) for s, t, r in openai.BLOCK_NAMES
    ),
    "mlp_bias_dropped": lambda: with_block_rule("ff.fc.bias", "zeros"),
    "attn_proj_bias_dropped": lambda: with_block_rule("att.out_proj.bias", "zeros"),
    "ln_f_ignored": None,
}


@pytest.mark.parametrize("mismap", MISMAPS)
def test_parity_check_catches_a_wrong_mapping(checkpoints, tmp_path, monkeypatch, mismap):
    folder, reference, _ = checkpoints["odd_heads"]
    conv = openai.RULES["conv"]
    monkeypatch.setitem(openai.RULES, "conv_qk_swapped", Rule(lambda a: swap_qk(conv.apply(a)), conv.source_shape))
    monkeypatch.setitem(openai.RULES, "conv_no_transpose", Rule(lambda a: a[0], conv.source_shape))
    monkeypatch.setitem(openai.RULES, "zeros", Rule(np.zeros_like, lambda shape: shape))
    monkeypatch.setitem(openai.RULES, "ones", Rule(np.ones_like, lambda shape: shape))
    if mismap == "ln_f_ignored":
        monkeypatch.setattr(
            openai,
            "FINAL_NAMES",
            (("model/ln_f/g", "final_norm.weight", "ones"), ("model/ln_f/b", "final_norm.bias", "zeros")),
        )
    else:
        monkeypatch.setattr(openai, "BLOCK_NAMES", MISMAPS[mismap]())
    out = tmp_path / "wrong.safetensors"
    convert_checkpoint(folder, out)
    with pytest.raises(AssertionError, match="max \\|logit diff\\|"):
        assert_parity(load_model(out), reference, SHAPES["odd_heads"])


def test_save_streaming_writes_what_save_model_writes(tiny_config, tmp_path):
    model = GPTModel(tiny_config)
    save_model(model, tmp_path / "a.safetensors")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in reversed(state.items())}  # any order
    save_streaming(tmp_path / "b.safetensors", tiny_config, shapes, state.__getitem__)
    (config_a, a), (config_b, b) = load_state(tmp_path / "a.safetensors"), load_state(tmp_path / "b.safetensors")
    assert config_a == config_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(WeightsError, match=r"c\.safetensors: tensor layout does not match .*pos_emb\.weight"):
        save_streaming(
            tmp_path / "c.safetensors",
            tiny_config,
            {k: v for k, v in shapes.items() if k != "pos_emb.weight"},
            state.__getitem__,
        )
    with pytest.raises(WeightsError, match=r"tensor pos_emb\.weight has shape \(3,\)"):
        save_streaming(
            tmp_path / "c.safetensors",
            tiny_config,
            shapes,
            lambda k: np.zeros(3) if k == "pos_emb.weight" else state[k],
        )
    assert not (tmp_path / "c.safetensors").exists() and len(list(tmp_path.iterdir())) == 2


# ---- bad checkpoints: one-line errors, no output ----

BAD = dict(n_vocab=11, n_ctx=4, n_embd=8, n_head=2, n_layer=2)


def bad_checkpoint(tmp_path, mirror_dir, edit=None, hparams=BAD):
    shapes = openai_shapes(hparams)
    if edit:
        edit(shapes)
    return write_checkpoint(tmp_path / "ckpt", hparams, shapes, mirror_dir / "gpt2")


def expect_error(folder, tmp_path, pattern: str) -> str:
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(WeightsError, match=pattern) as info:
        convert_checkpoint(folder, out)
    message = str(info.value)
    assert "\n" not in message
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing half-written
    return message


def test_missing_variable(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir, lambda s: s.pop("model/h1/ln_2/b"))
    expect_error(folder, tmp_path, r"model\.ckpt: variable model/h1/ln_2/b missing")


def test_extra_variable(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir, lambda s: s.update({"model/h2/ln_1/g": (8,)}))
    expect_error(folder, tmp_path, r"unexpected variable model/h2/ln_1/g")


def test_misshaped_variable(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir, lambda s: s.update({"model/h0/mlp/c_fc/w": (1, 8, 24)}))
    expect_error(folder, tmp_path, r"variable model/h0/mlp/c_fc/w has shape \[1, 8, 24\], expected \[1, 8, 32\]")


def test_hparams_that_disagree_with_the_tensors(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir)
    (folder / "hparams.json").write_text(json.dumps({**BAD, "n_ctx": 1024}))
    expect_error(folder, tmp_path, r"variable model/wpe has shape \[4, 8\], expected \[1024, 8\] from hparams.json")


def test_truncated_data_file(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir)
    data = folder / "model.ckpt.data-00000-of-00001"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 100)
    expect_error(
        folder, tmp_path, rf"data-00000-of-00001: {size - 100:,} bytes, but the index needs {size:,} \(truncated"
    )


def test_corrupt_data_file(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir)
    data = folder / "model.ckpt.data-00000-of-00001"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # TensorFlow's per-tensor checksum catches it
    data.write_bytes(bytes(blob))
    expect_error(folder, tmp_path, r"model\.ckpt: cannot read model/\S+ \(corrupt or truncated data file\)")


@pytest.mark.parametrize(
    "missing, pattern",
    [
        ("hparams.json", r"hparams\.json: not found"),
        ("model.ckpt.index", r"model\.ckpt\.index: missing from the checkpoint"),
        ("model.ckpt.data-00000-of-00001", r"model\.ckpt\.data-00000-of-00001: missing from the checkpoint"),
    ],
)
def test_missing_file(tmp_path, mirror_dir, missing, pattern):
    folder = bad_checkpoint(tmp_path, mirror_dir)
    (folder / missing).unlink()
    expect_error(folder, tmp_path, pattern)


def test_unreadable_index(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir)
    (folder / "model.ckpt.index").write_bytes(b"<html>not found</html>")
    expect_error(folder, tmp_path, r"model\.ckpt\.index: unreadable checkpoint index")


def test_foreign_vocabulary(tmp_path, mirror_dir):
    folder = bad_checkpoint(tmp_path, mirror_dir)
    (folder / "vocab.bpe").write_text("#version: 0.2\na b\n")
    expect_error(folder, tmp_path, r"vocab\.bpe: not GPT-2's vocab\.bpe")


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{", r"hparams\.json: not valid JSON"),
        ("[1]", r"expected a JSON object"),
        (json.dumps({k: v for k, v in BAD.items() if k != "n_head"}), r"missing n_head"),
        (json.dumps({**BAD, "n_special": 0}), r"unknown key\(s\) n_special"),
        (json.dumps({**BAD, "n_embd": 8.0}), r"n_embd must be an integer"),
        (json.dumps({**BAD, "n_head": 3}), r"emb_dim \(8\) must be divisible by n_heads \(3\)"),
    ],
)
def test_bad_hparams(tmp_path, content, pattern):
    path = tmp_path / "hparams.json"
    path.write_text(content)
    with pytest.raises(WeightsError, match=pattern):
        read_hparams(path)


def test_cli_error_is_one_line(tmp_path, mirror_dir, capsys):
    folder = bad_checkpoint(tmp_path, mirror_dir, lambda s: s.pop("model/wpe"))
    assert cli_main(["convert", str(folder), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "model/wpe missing" in err


# ---- the foundation stage, end to end from a mirror ----


@pytest.mark.slow
def test_one_switch_fetches_converts_and_finetunes(repo_copy, tmp_path, mirror_dir, monkeypatch):
    """`dvc exp run -S foundation=gpt2-small` alone: the download_gpt2 stage fetches the TensorFlow
    checkpoint (written by TensorFlow in OpenAI's layout, in a temporary mirror) into models/gpt2-small/,
    the foundation stage converts it with outputs identical to the reference, and the classifier
    finetunes from it; Stage 1 does not re-run, and switching back re-runs only what depends on the
    foundation."""
    mirror = tmp_path / "mirror"
    shutil.copytree(mirror_dir, mirror)
    hparams = dict(n_vocab=50257, n_ctx=24, n_embd=8, n_head=2, n_layer=1)
    reference = hf_model(hparams, seed=7)
    write_checkpoint(mirror / "gpt2" / "models" / "124M", hparams, openai_arrays(reference, 1), mirror_dir / "gpt2")
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror))
    shutil.copy2(Path(__file__).parents[2] / "params-quickstart.yaml", repo_copy.root / "params.yaml")
    repo_copy.set_params({"classifier": {"epochs": 1}})
    repo_copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "quickstart params")
    repo_copy.dvc("repro", "finetune_classifier")  # the scratch foundation
    scratch_metrics = repo_copy.read_json("metrics/classifier.json")

    switched = repo_copy.dvc("exp", "run", "-S", "foundation=gpt2-small", "finetune_classifier")
    ran = re.findall(r"Running stage '([^']+)'", switched.stdout)
    assert ran == ["download_gpt2", "foundation", "finetune_classifier"], switched.stdout
    assert sorted(p.name for p in (repo_copy.root / "models/gpt2-small").iterdir()) == sorted(
        [*CHECKPOINT_FILES, ".source"]
    )
    assert_parity(load_model(repo_copy.root / "models/foundation/model.safetensors"), reference, hparams)
    assert load_model(repo_copy.root / "models/classifier/model.safetensors").config.emb_dim == 8
    assert repo_copy.read_json("metrics/classifier.json") != scratch_metrics
    assert "up to date" in repo_copy.dvc("status", "finetune_classifier").stdout

    back = repo_copy.dvc("exp", "run", "-S", "foundation=scratch", "finetune_classifier")
    assert re.findall(r"Running stage '([^']+)'", back.stdout) == ["finetune_classifier"], back.stdout
    assert "Stage 'foundation' is cached" in back.stdout  # DVC's run cache restores the scratch copy
    assert _without_timing(repo_copy.read_json("metrics/classifier.json")) == _without_timing(scratch_metrics)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k and "per_s" not in k}
