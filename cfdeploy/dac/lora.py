"""DAC's adapters: PEFT LoRAs on the UNet (U) and the text encoder (Δ, and T in the ``t`` variant).

Each adapter is injected with PEFT as the official scripts configure it (``lora_alpha = r``, gaussian
init). Its weight is PEFT's per-adapter scale: U's is set to γ(t) before every UNet call, Δ's to −β.
Adapter files are PEFT state dicts in safetensors, with the rank and targets in the metadata; a reload
refuses a file that does not fill every adapted layer (a diffusers conversion once dropped 32 silently).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfdeploy.errors import CfdeployError
from cfdeploy.files import read_tensors
from cfdeploy.outputs import write_atomic

UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_ADAPTER = "U"
EDIT_ADAPTER = "delta"  # Δ, fitted on (I, P′), subtracted to edit
SOURCE_ADAPTER = "T"  # the ``t`` variant's text adapter, fitted on (I, P), kept at +1
FORMAT = "cfdeploy-dac-lora"


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter: its name in the model, rank (= alpha) and the module names it targets."""

    name: str
    rank: int
    targets: tuple[str, ...]

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "adapter": self.name,
            "rank": str(self.rank),
            "targets": json.dumps(list(self.targets)),
        }


def lora_layers(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """PEFT's LoRA layers in ``model`` (those holding ``adapter``, when given), by module name."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and (adapter is None or adapter in module.lora_A)
    }


def add_adapter(model: nn.Module, spec: AdapterSpec, seed: int) -> int:
    """Inject ``spec`` into ``model`` (initialised from ``seed`` alone) and return how many layers it adapts."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian", target_modules=list(spec.targets)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=spec.name)
    model.requires_grad_(False)
    return len(lora_layers(model, spec.name))


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active adapters of every LoRA layer; nothing is left trainable."""
    for layer in lora_layers(model).values():
        layer.set_adapter([name for name in names if name in layer.lora_A])
    model.requires_grad_(False)


def set_weight(model: nn.Module, adapter: str, weight: float) -> None:
    """The adapter's weight in every layer: its output is ``weight · (alpha/r) · B·A·x``."""
    for layer in lora_layers(model, adapter).values():
        layer.set_scale(adapter, weight)


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The adapter's A and B weights, made trainable (the optimiser's parameters, in a fixed order)."""
    parameters = [
        parameter
        for name, parameter in model.named_parameters()
        if (f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name)
    ]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def adapter_state(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's PEFT state dict (keys without the adapter name), contiguous CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in state.items()}


def save_adapter(path: Path, model: nn.Module, spec: AdapterSpec) -> None:
    from safetensors.torch import save

    write_atomic(path, save(adapter_state(model, spec.name), metadata=spec.metadata()))


def read_adapter(path: Path, name: str) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """An adapter file's spec and tensors; a file that is not one of ours is refused in one line."""
    arrays, metadata = read_tensors(path)
    state = {key: torch.from_numpy(array) for key, array in arrays.items()}
    if metadata.get("format") != FORMAT:
        raise CfdeployError(f"{path}: not a cfdeploy DAC adapter (metadata format {metadata.get('format')!r})")
    try:
        spec = AdapterSpec(name, int(metadata["rank"]), tuple(json.loads(metadata["targets"])))
    except (KeyError, ValueError, TypeError) as error:
        raise CfdeployError(f"{path}: damaged adapter metadata ({error})") from None
    if metadata.get("adapter") != name:
        raise CfdeployError(f"{path}: holds adapter {metadata.get('adapter')!r}, expected {name!r}")
    for key, tensor in state.items():
        if "lora_A" in key and (tensor.ndim < 2 or tensor.shape[0] != spec.rank):
            raise CfdeployError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, not rank {spec.rank} as its metadata says"
            )
    if spec.rank < 1 or not state:
        raise CfdeployError(f"{path}: an empty adapter (rank {spec.rank}, {len(state)} tensors)")
    return spec, state


def fill_adapter(model: nn.Module, name: str, state: dict[str, torch.Tensor], source: Path) -> int:
    """Set the injected adapter ``name`` from ``state``; returns the adapted-layer count.

    Every adapted layer must come from ``state``, with the shape the model gives it: a file missing
    layers (or with extra ones) is refused, never half-loaded.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    wanted = {key: tensor.shape for key, tensor in get_peft_model_state_dict(model, adapter_name=name).items()}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    count = len(lora_layers(model, name))
    if missing or extra:
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{len(extra)} unexpected (e.g. {extra[0]})"
        )
        raise CfdeployError(f"{source}: does not match this model's {count} adapted layers: {detail}")
    for key, tensor in state.items():
        if tensor.shape != wanted[key]:
            raise CfdeployError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, this model needs {tuple(wanted[key])}"
            )
    set_peft_model_state_dict(model, state, adapter_name=name)
    model.requires_grad_(False)
    return count


def load_adapter(path: Path, model: nn.Module, name: str, targets: Sequence[str]) -> int:
    """Inject the adapter saved at ``path`` into ``model`` as ``name`` and fill it; returns the adapted-layer count."""
    spec, state = read_adapter(path, name)
    if tuple(spec.targets) != tuple(targets):
        raise CfdeployError(f"{path}: adapts {', '.join(spec.targets)}, expected {', '.join(targets)}")
    add_adapter(model, spec, seed=0)
    try:
        return fill_adapter(model, name, state, path)
    except CfdeployError:
        for layer in lora_layers(model, name).values():
            layer.delete_adapter(name)
        raise
