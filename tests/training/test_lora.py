"""LoRA: an untrained adapter changes nothing, only adapters train, merging is exact up to rounding, and
the adapter file round-trips and refuses a foreign base."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from gptcore.config import GPTConfig
from gptcore.errors import ConfigError, WeightsError
from gptcore.model import GPTModel, set_activation_checkpointing
from gptcore.training.adapter_file import apply_adapter, read_adapter, save_adapter
from gptcore.training.lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    load_adapter_state,
    mark_only_lora_as_trainable,
    merge_lora,
)

BASE = "ab" * 32  # a sha256 hex digest
OTHER = "cd" * 32


def _tokens(config: GPTConfig, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(7))


def _randomize_b(model: nn.Module) -> None:
    """Give every adapter a non-zero update, as training would."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()


def _one_line_error(kind, call, *words):
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def test_untrained_adapter_gives_bitwise_the_base_logits(tiny_config):
    model = GPTModel(tiny_config).eval()
    idx = _tokens(tiny_config)
    base, keys = model(idx), set(model.state_dict())
    names = apply_lora(model, LoRAConfig(rank=4, dropout=0.1))
    assert names[:4] == [
        "trf_blocks.0.att.qkv",
        "trf_blocks.0.att.out_proj",
        "trf_blocks.0.ff.fc",
        "trf_blocks.0.ff.proj",
    ]
    assert names[-1] == "out_head" and len(names) == 4 * tiny_config.n_layers + 1
    assert torch.equal(model(idx), base)
    added = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict()) and added == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}


def test_from_linear_shares_and_freezes_the_base_parameters():
    torch.manual_seed(0)
    linear = nn.Linear(20, 6)
    lora = LoRALinear.from_linear(linear, LoRAConfig(rank=3, alpha=6.0))
    assert lora.weight is linear.weight and lora.bias is linear.bias
    assert not lora.weight.requires_grad and not lora.bias.requires_grad
    assert lora.lora_A.shape == (3, 20) and lora.lora_B.shape == (6, 3) and lora.scaling == 2.0
    assert lora.lora_A.abs().max() <= 20**-0.5 and torch.count_nonzero(lora.lora_B) == 0  # nn.Linear's bound
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 5, 20)
    expected = linear(x) + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.merged_weight(), linear.weight + 2.0 * lora.lora_B @ lora.lora_A)


def test_adapters_are_drawn_from_the_seeded_global_generator(tiny_config):
    models = [GPTModel(tiny_config) for _ in range(2)]
    for model in models:
        torch.manual_seed(5)
        apply_lora(model, LoRAConfig(rank=4))
    a, b = (adapter_state_dict(m) for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_backward_pass_reaches_only_the_adapters_and_the_new_head(tiny_config):
    model = GPTModel(dataclasses.replace(tiny_config, num_classes=2))
    apply_lora(model, LoRAConfig(rank=4, targets=("qkv", "out_proj", "fc", "proj")))
    trainable = mark_only_lora_as_trainable(model, also=["out_head"])
    expected = [n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B")) or n.startswith("out_head.")]
    assert [id(p) for p in trainable] == [id(p) for n, p in model.named_parameters() if n in expected]
    _randomize_b(model)  # so that A gets a gradient too
    model(_tokens(tiny_config))[:, -1].logsumexp(-1).sum().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == expected
    assert all(torch.count_nonzero(p.grad) > 0 for p in trainable)


def test_merged_logits_equal_unmerged_after_training(tiny_config):
    model = GPTModel(tiny_config)
    base_keys = list(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    optimizer = torch.optim.AdamW(mark_only_lora_as_trainable(model), lr=1e-2)
    idx = _tokens(tiny_config)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        unmerged = model(idx)
        merged = merge_lora(model)(idx)
    assert merged.dtype == torch.float32 and (merged - unmerged).abs().max() <= 1e-5
    assert list(model.state_dict()) == base_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_merging_changes_only_the_targeted_weights_by_rank_r(tiny_config):
    model = GPTModel(tiny_config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoRAConfig(rank=3, targets=("qkv", "fc")))
    _randomize_b(model)
    merged = merge_lora(model).state_dict()
    targeted = {f"{name}.weight" for name in names}
    assert len(targeted) == 2 * tiny_config.n_layers
    for key, tensor in merged.items():
        if key in targeted:
            assert 0 < torch.linalg.matrix_rank(tensor - base[key]) <= 3, key
        else:
            assert torch.equal(tensor, base[key]), key


def test_bf16_base_with_fp32_adapters_trains():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    model = GPTModel(config).to(torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=4))
    trainable = mark_only_lora_as_trainable(model)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    _randomize_b(model)
    logits = model(_tokens(config))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_autocast_gives_the_base_output_and_trains(tiny_config):
    model = GPTModel(tiny_config).eval()
    idx = _tokens(tiny_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(idx)
        apply_lora(model, LoRAConfig(rank=4))
        assert torch.equal(model(idx), base)
        trainable = mark_only_lora_as_trainable(model)
        _randomize_b(model)
        model(idx).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"rank": 0}, ["rank", "0"]),
        ({"dropout": 1.0}, ["dropout", "[0, 1)"]),
        ({"alpha": 0.0}, ["alpha", "positive"]),
        ({"targets": ("qkv", "attn")}, ["'attn'", ", ".join(TARGETS)]),
        ({"targets": ()}, ["targets"]),
    ],
)
def test_a_bad_config_is_one_line_naming_the_problem(fields, words):
    _one_line_error(ConfigError, lambda: LoRAConfig(**fields), *words)


def test_a_rank_wider_than_a_layer_or_a_missing_target_is_refused(tiny_config):
    model = GPTModel(tiny_config)
    _one_line_error(ConfigError, lambda: apply_lora(model, LoRAConfig(rank=33)), "33", "trf_blocks.0.att.qkv", "32")
    _one_line_error(ConfigError, lambda: apply_lora(model.trf_blocks, LoRAConfig(targets=("out_head",))), "out_head")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing replaced before the error
    _one_line_error(ConfigError, lambda: mark_only_lora_as_trainable(model, also=["head"]), "'head'")
    tied = GPTModel(dataclasses.replace(tiny_config, tie_embeddings=True))
    _one_line_error(ConfigError, lambda: apply_lora(tied, LoRAConfig(rank=4)), "out_head", "tied")
    assert LoRAConfig.from_dict(LoRAConfig(rank=2).to_dict()) == LoRAConfig(rank=2)
    _one_line_error(ConfigError, lambda: LoRAConfig.from_dict({"r": 2}), "r", "rank")


def test_adapter_file_round_trips_bit_identically(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, num_classes=2)
    base_state = GPTModel(config).state_dict()
    model = GPTModel(config).eval()
    model.load_state_dict(base_state)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("qkv", "proj"))
    apply_lora(model, lora)
    _randomize_b(model)
    tensors = adapter_state_dict(model, also=["out_head"])
    assert set(tensors) >= {"out_head.weight", "out_head.bias"}
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, tensors, lora, BASE, extra={"stage": "classifier"})
    first = path.read_bytes()
    save_adapter(path, tensors, lora, BASE, extra={"stage": "classifier"})
    assert path.read_bytes() == first  # deterministic bytes (DVC hashes them)

    adapter = read_adapter(path)
    assert adapter.config == lora and adapter.base_sha256 == BASE and adapter.extra == {"stage": "classifier"}
    assert adapter.tensors.keys() == tensors.keys()
    assert all(torch.equal(adapter.tensors[k], v) and adapter.tensors[k].dtype == v.dtype for k, v in tensors.items())

    fresh = GPTModel(config).eval()
    fresh.load_state_dict(base_state)
    _one_line_error(WeightsError, lambda: apply_adapter(fresh, adapter, OTHER), str(path), BASE[:12], OTHER[:12])
    idx = _tokens(tiny_config)
    assert torch.equal(apply_adapter(fresh, adapter, BASE)(idx), model(idx))


def test_a_bad_adapter_is_refused_in_one_line(tiny_config, tmp_path):
    from gptcore.weights import save_model

    save_model(GPTModel(tiny_config), tmp_path / "model.safetensors")
    _one_line_error(WeightsError, lambda: read_adapter(tmp_path / "model.safetensors"), "not a gptcore LoRA adapter")
    _one_line_error(WeightsError, lambda: read_adapter(tmp_path / "none.safetensors"), "not found")
    model = GPTModel(tiny_config)
    apply_lora(model, LoRAConfig(rank=2))
    tensors = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    save_adapter(tmp_path / "a.safetensors", tensors, LoRAConfig(rank=2, alpha=0.5), BASE)
    assert read_adapter(tmp_path / "a.safetensors").config.alpha == 0.5
    missing = {k: v for k, v in tensors.items() if k != "out_head.lora_B"}
    _one_line_error(WeightsError, lambda: load_adapter_state(model, missing), "missing tensor out_head.lora_B")
    unexpected = {**tensors, "trf_blocks.9.ff.fc.lora_A": tensors["out_head.lora_A"]}
    _one_line_error(WeightsError, lambda: load_adapter_state(model, unexpected), "unexpected tensor trf_blocks.9")
    misshaped = {**tensors, "out_head.lora_A": torch.zeros(3, 32)}
    _one_line_error(WeightsError, lambda: load_adapter_state(model, misshaped), "out_head.lora_A", "(3, 32)")


def test_trainable_parameters_of_gpt2_small_classifier():
    """GPT-2 124M with a 2-class head, r = 16 on every Linear (the book's appendix E setting).

    Per block, a LoRA on a Linear [in -> out] adds A [16, in] + B [out, 16] = 16 (in + out):
      qkv      768 -> 2304: 16 * 3072 = 49,152
      out_proj 768 ->  768: 16 * 1536 = 24,576
      fc       768 -> 3072: 16 * 3840 = 61,440
      proj    3072 ->  768: 16 * 3840 = 61,440
      block total                      196,608;  x 12 blocks = 2,359,296
    out_head 768 -> 2: 16 * 770 = 12,320.  Total 2,371,616 trainable of 124,441,346 (1.91%).
    The book reports 2,666,528 with separate W_query, W_key, W_value Linears [768 -> 768]: three A [16, 768]
    and three B [768, 16] per block, where our fused qkv [768 -> 2304] has one A [16, 768] and one
    B [2304, 16] (the same B entries). The difference, 294,912 = 12 blocks x 2 x 16 x 768, is the two
    extra A matrices per block.
    """
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_name("gpt2-small", num_classes=2))
    assert model.num_parameters() == 124_441_346
    apply_lora(model, LoRAConfig(rank=16, alpha=16.0))
    trainable = sum(p.numel() for p in mark_only_lora_as_trainable(model))
    assert trainable == 12 * 16 * (3072 + 1536 + 3840 + 3840) + 16 * 770 == 2_371_616
    assert 2_666_528 - trainable == 12 * 2 * 16 * 768
    adapter_bytes = 4 * sum(t.numel() for t in adapter_state_dict(model).values())
    assert adapter_bytes <= 0.02 * 4 * 124_441_346


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    tiny_config = dataclasses.replace(tiny_config, vocab_size=97)
    model = GPTModel(tiny_config).train()
    apply_lora(model, LoRAConfig(rank=4, dropout=0.1))
    mark_only_lora_as_trainable(model)
    _randomize_b(model)
    recomputing = copy.deepcopy(model)
    set_activation_checkpointing(recomputing, True)
    idx = _tokens(tiny_config)
    grads = []
    for m in (model, recomputing):
        torch.manual_seed(3)  # the same LoRA dropout masks; checkpointing replays them in the recomputation
        m(idx).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * (4 * tiny_config.n_layers + 1)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_under_autocast_the_adapter_shares_the_cast_input_and_computes_as_autocast_would():
    """One bf16 copy of x feeds both products (less activation memory); the values are autocast's own."""
    import torch.nn.functional as F

    from gptcore.training.lora import LoRAConfig, LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(24, 40), LoRAConfig(rank=4, alpha=8.0))
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
        delta = F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B)
        expected = base + (layer.scaling * delta).to(base.dtype)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    got.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
