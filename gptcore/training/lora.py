"""LoRA: low-rank adapters on a frozen GPTModel's Linear layers, and merging them back into plain weights.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685), eq. 3, in the
form of Raschka's "Build a Large Language Model (From Scratch)", appendix E: a frozen layer W x + b gains
a trainable update (alpha / r) B A x, with A [r, in] drawn as nn.Linear draws its weight and B [out, r]
zero, so that an untrained adapter changes nothing. Only A and B train: for GPT-2 124M at r = 16 about
2% of the parameters, and a finished adapter merges into W at no inference cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptcore.errors import ConfigError, WeightsError

# The attribute names of GPTModel's Linear layers: attention's fused q/k/v and output projections, the
# MLP's two layers, and the output head.
TARGETS = ("qkv", "out_proj", "fc", "proj", "out_head")
LORA_PARAMS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get an adapter, and its size; saved in every adapter file.

    Raises:
        ConfigError: one line naming the bad field (rank < 1, dropout outside [0, 1), alpha <= 0, an
            unknown or no target).
    """

    rank: int = 16  # r: the inner dimension of B A
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout probability on the adapter's input (the base path has none of its own)
    targets: tuple[str, ...] = TARGETS  # attribute names of the Linear layers to adapt

    def __post_init__(self):
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"lora targets must be a list of layer names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if type(self.rank) is not int or self.rank < 1:
            raise ConfigError(f"lora rank must be an integer of at least 1, got {self.rank!r}")
        if type(self.alpha) not in (int, float) or not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if type(self.dropout) not in (int, float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError(f"lora targets must name at least one layer of {', '.join(TARGETS)}")
        for target in self.targets:
            if target not in TARGETS:
                raise ConfigError(f"lora target {target!r} is unknown; expected some of {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor on B A x (Hu et al. 2021, section 4.1)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build from a mapping (params.yaml, an adapter file's metadata).

        Raises:
            ConfigError: an unknown key, or a bad value (one line).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"lora: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"lora: {unknown[0]}: unknown key; expected one of {', '.join(fields)}")
        return cls(**data)


class LoRALinear(nn.Linear):
    """A Linear layer plus a low-rank update: y = W x + b + (alpha / r) B (A dropout(x)).

    Keeps the wrapped layer's own `weight` [out, in] and `bias` [out] Parameters (state_dict keys are
    unchanged) and adds `lora_A` [r, in] and `lora_B` [out, r]. A is drawn as nn.Linear draws a [r, in]
    weight (Kaiming-uniform, a = sqrt(5): U(+-1/sqrt(in)), as peft does; the book's A is [in, r], which
    gives U(+-1/sqrt(r))), from torch's global generator; B is zero. The adapter has its own dtype (fp32
    by default) whatever the base's: a bf16 base with fp32 adapters trains in half the memory.
    """

    def __init__(self, linear: nn.Linear, config: LoRAConfig, dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear's, which would allocate and draw a second weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.rank, self.scaling = config.rank, config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig, dtype: torch.dtype = torch.float32) -> LoRALinear:
        """Wrap `linear` for finetuning: its Parameters are shared (not copied) and frozen."""
        lora = cls(linear, config, dtype)
        for param in (lora.weight, lora.bias):
            if param is not None:
                param.requires_grad_(False)
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in the base path's dtype.

        The base path is nn.Linear's own call, so with B = 0 the output is bitwise the base layer's
        (adding an exact zero). The adapter computes in A's dtype, or autocast's where one is active:
        there x is cast once, and both products use (and save for backward) that one copy, where autocast
        would cast it for each: the same values, one activation copy less per layer.
        """
        device = x.device.type
        autocasting = torch.is_autocast_enabled(device)
        if autocasting:
            x = x.to(torch.get_autocast_dtype(device))
        out = F.linear(x, self.weight, self.bias)  # [..., out]
        h = self.lora_dropout(x) if autocasting else self.lora_dropout(x).to(self.lora_A.dtype)  # [..., in]
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B)  # [..., r] -> [..., out]: r(in + out) per row
        return out + (self.scaling * delta).to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A [out, in], computed in fp32 and returned in W's dtype and device."""
        delta = self.lora_B.float() @ self.lora_A.float()  # [out, in]
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, config: LoRAConfig, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace each Linear whose attribute name is in config.targets by a LoRALinear, in place.

    Every layer is checked before any is replaced. A is drawn from torch's global generator: seed it
    for reproducible adapters. Returns the qualified names of the replaced layers, in model order.

    Raises:
        ConfigError: the rank exceeds a layer's inputs (A [r, in] would have more rows than its input
            has dimensions), a target matches no layer, or a targeted layer's weight is tied to another
            (GPT-2's out_head and tok_emb: a merged adapter would have to untie them).
        ValueError: the model already has LoRA layers.
    """
    found = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in config.targets]
    layers = [(name, m) for name, m in found if isinstance(m, nn.Linear)]
    already = [name for name, m in layers if isinstance(m, LoRALinear)]
    if already:
        raise ValueError(f"the model already has LoRA layers ({already[0]})")
    missing = [t for t in config.targets if not any(name.rsplit(".", 1)[-1] == t for name, _ in layers)]
    if missing:
        raise ConfigError(f"lora target {missing[0]!r} matches no Linear layer of the model")
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, linear in layers:
        if config.rank > linear.in_features:
            raise ConfigError(f"lora rank {config.rank} is larger than {name}'s {linear.in_features} inputs")
        if uses[id(linear.weight)] > 1:
            raise ConfigError(f"lora target {name} shares its weight with another layer (tied); leave it out")
    for name, linear in layers:
        _replace_module(model, name, LoRALinear.from_linear(linear, config, dtype))
    return [name for name, _ in layers]


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _is_lora(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def _selected(name: str, also: Iterable[str]) -> bool:
    """True for a LoRA parameter or one inside a module named in `also` ("out_head" selects out_head.*)."""
    return _is_lora(name) or any(name == prefix or name.startswith(prefix + ".") for prefix in also)


def _check_also(model: nn.Module, also: tuple[str, ...]) -> None:
    names = [name for name, _ in model.named_parameters()]
    for prefix in also:
        if not any(_selected(name, (prefix,)) and not _is_lora(name) for name in names):
            raise ConfigError(f"{prefix!r} names no parameter of the model")


def mark_only_lora_as_trainable(model: nn.Module, also: Iterable[str] = ()) -> list[nn.Parameter]:
    """Set requires_grad on lora_A/lora_B and on parameters under the names in `also` (a classifier's
    new "out_head"); clear it on all others. Returns the trainable parameters in model order.

    Raises:
        ConfigError: a name in `also` selects no parameter.
    """
    also = tuple(also)
    _check_also(model, also)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(_selected(name, also))
        if param.requires_grad:
            trainable.append(param)
    return trainable


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each LoRALinear into a plain nn.Linear with weight W + (alpha / r) B A, in place.

    The merged weight has the base's dtype, device and requires_grad; the bias is the same Parameter.
    Afterwards the state_dict has exactly the base model's keys. Returns the model.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in layers:
        # Built on the meta device: nothing allocated, nothing drawn from the generator.
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight = nn.Parameter(lora.merged_weight(), requires_grad=lora.weight.requires_grad)
        linear.bias = lora.bias
        _replace_module(model, name, linear)
    return model


def adapter_state_dict(model: nn.Module, also: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The lora_A/lora_B tensors, and those of the parameters under the names in `also`, by qualified
    name (detached; they share memory with the model)."""
    also = tuple(also)
    _check_also(model, also)
    return {name: param.detach() for name, param in model.named_parameters() if _selected(name, also)}


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into a model that has LoRA applied with the adapter's config.

    Every lora_A/lora_B of the model must be given; other names must be parameters of the model (the
    `also` parameters saved beside them). Values are converted to each parameter's dtype and device.

    Raises:
        WeightsError: one line naming a missing, unexpected or misshaped tensor.
    """
    params = dict(model.named_parameters())
    missing = sorted(name for name in params if _is_lora(name) and name not in tensors)
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected)")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
            )
    for name, tensor in tensors.items():
        params[name].copy_(tensor)
