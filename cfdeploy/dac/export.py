"""``dac export``: a DAC run as a torch-free bundle of ONNX graphs (see :mod:`cfdeploy.dac.bundle`).

The UNet keeps U as unmerged low-rank branches whose weight is the graph input ``lora_scale`` (the exact
γ(t) path), or has U merged at one weight (``merged``: a stock UNet graph, faster, an approximation
whose difference from the exact path is measured at export and recorded). The text encoder keeps Δ as
a branch weighted by ``text_lora_scale`` (β sweeps); the default β's embeddings ship precomputed. Each
graph is checked against PyTorch in ONNX Runtime before the bundle is written.

Each graph keeps its weights beside it (``GRAPH.onnx.data``: Stable Diffusion's UNet is over protobuf's 2 GB).
The text encoder and the VAE decoder are reused from the export cache (:func:`~cfdeploy.exporter.export_cache`)
when exported before from the same weights: the VAE decoder by every run of one base model, the text encoder by a
run exported again (``--unet merged`` after the exact UNet). The UNet, U included, is each run's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cfdeploy.contracts import NetworkContract, dac_contracts
from cfdeploy.dac import lora
from cfdeploy.dac.base_model import (
    check_same_base_model,
    inspect_base_model,
    load_base_model,
)
from cfdeploy.dac.bundle import (
    BUNDLE_FORMAT,
    EMBEDDINGS,
    FORMAT_VERSION,
    SCHEDULER_CONFIG,
    TOKENS,
    UNET_MODES,
)
from cfdeploy.dac.plms import PlmsScheduler, anneal
from cfdeploy.dac.predict import (
    edit_embeddings,
    load_run_adapters,
    text_adapter_weights,
)
from cfdeploy.dac.refit_map import match_initializers
from cfdeploy.dac.run import MANIFEST, read_run
from cfdeploy.environment import versions
from cfdeploy.errors import CfdeployError
from cfdeploy.exporter import DEFAULT_OPSET, export_cache, export_checked
from cfdeploy.files import sha256_file
from cfdeploy.graph_cache import GraphCache
from cfdeploy.outputs import StagedDirectory


class _LoraScaleInput(nn.Module):
    """Runs ``model`` with ``adapter``'s weight taken from a tensor, so the exported graph has it as an input."""

    def __init__(self, model: nn.Module, adapter: str) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.layers = list(lora.lora_layers(model, adapter).values())

    @contextmanager
    def weighted(self, weight: torch.Tensor) -> Iterator[None]:
        for layer in self.layers:
            layer.scaling[self.adapter] = weight[0] * (layer.lora_alpha[self.adapter] / layer.r[self.adapter])
        try:
            yield
        finally:
            for layer in self.layers:
                layer.set_scale(self.adapter, 1.0)


class ScaledUNet(_LoraScaleInput):
    """``noise = unet(sample, timestep, encoder_hidden_states)`` with U at weight ``lora_scale``."""

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, lora_scale: torch.Tensor
    ) -> torch.Tensor:
        with self.weighted(lora_scale):
            noise: torch.Tensor = self.model(sample, timestep, encoder_hidden_states=context).sample
        return noise


class MergedUNet(nn.Module):
    """The UNet with U already merged into its weights."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        noise: torch.Tensor = self.unet(sample, timestep, encoder_hidden_states=context).sample
        return noise


class ScaledTextEncoder(_LoraScaleInput):
    """``hidden_states = text_encoder(tokens)`` with Δ at weight ``text_lora_scale``."""

    def forward(self, tokens: torch.Tensor, text_lora_scale: torch.Tensor) -> torch.Tensor:
        with self.weighted(text_lora_scale):
            hidden: torch.Tensor = self.model(tokens)[0]
        return hidden


class VaeDecoder(nn.Module):
    """Sampled latents to an image in about [-1, 1] (the scaling factor applied inside)."""

    def __init__(self, vae: Any, scaling_factor: float) -> None:
        super().__init__()
        self.vae: Any = vae
        self.scaling_factor = scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        image: torch.Tensor = self.vae.decode(latents / self.scaling_factor).sample
        return image


def merge_scale(eta: float, scheduler_config: dict[str, Any], steps: int = 30) -> float:
    """The one weight a merged U gets: the mean of γ(t) over the default 30-step schedule's UNet calls."""
    timesteps = PlmsScheduler(scheduler_config).set_timesteps(steps)
    return float(np.mean([anneal(int(t), eta) for t in timesteps]))


def export_dac_bundle(
    run_path: Path,
    out: Path,
    *,
    unet_mode: str = "scale-input",
    base_model: Path | None = None,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    reuse_exports: bool = True,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """Export the run at ``run_path`` to a DAC bundle in ``out``; returns its manifest.

    ``reuse_exports``: the text encoder and VAE decoder graphs come from the export cache where they were exported
    before (the manifest lists them under ``export.reused``), and are checked against PyTorch like new ones."""
    if unet_mode not in UNET_MODES:
        raise CfdeployError(f"--unet must be one of {', '.join(UNET_MODES)}, got {unet_mode!r}")
    run = read_run(run_path)
    recorded = run.manifest["base_model"]
    on_stage("hashing the base model")
    info = inspect_base_model(base_model or Path(str(recorded.get("path"))))
    check_same_base_model(info, recorded, run_path)
    settings = run.settings
    eta, resolution = settings.eta, settings.resolution
    side = resolution // info.vae_scale_factor
    hidden_size = int(info.configs["text_encoder"]["hidden_size"])
    contracts = dac_contracts(info.latent_channels, side, resolution, hidden_size, unet_mode == "scale-input")
    with StagedDirectory(out, force, inputs=[run_path, info.path]) as staged:
        on_stage("loading the base model")
        base = load_base_model(info)
        load_run_adapters(base, run)
        text_weights = text_adapter_weights(settings.variant, 1.0)
        cond, uncond = edit_embeddings(base, settings.target, text_weights)
        tokens = torch.cat([base.tokens(""), base.tokens(settings.target)])
        staged.write_npy(TOKENS, tokens.numpy().astype(np.int64))
        staged.write_npy(EMBEDDINGS, torch.cat([uncond, cond]).numpy())
        staged.write_json(SCHEDULER_CONFIG, dict(info.configs["scheduler"]))
        rng = torch.Generator().manual_seed(0)
        latents = torch.randn((2, info.latent_channels, side, side), generator=rng)
        context = torch.cat([uncond, cond])
        parity: dict[str, dict[str, float]] = {}
        cache = export_cache() if reuse_exports else None
        reused: list[str] = []

        on_stage("exporting the text encoder")
        lora.activate(base.text_encoder, list(text_weights))
        if settings.variant == "t":
            lora.set_weight(base.text_encoder, lora.SOURCE_ADAPTER, 1.0)
        text_encoder = ScaledTextEncoder(base.text_encoder, lora.EDIT_ADAPTER).eval()
        text_cases = [(tokens, torch.tensor([weight])) for weight in (-1.0, -0.5, 0.0)]
        parity["text_encoder"] = _export(
            text_encoder, contracts["text_encoder"], staged.path, opset, text_cases, cache, reused
        )

        on_stage("exporting the UNet")
        cases = [(latents, torch.tensor([float(t)]), context) for t in (958, 500, 1)]
        if unet_mode == "scale-input":
            unet: nn.Module = ScaledUNet(base.unet, lora.UNET_ADAPTER).eval()
            unet_cases = [(*case, torch.tensor([anneal(float(case[1][0]), eta)])) for case in cases]
            parity["unet"] = _export(unet, contracts["unet"], staged.path, opset, unet_cases)
            merged_scale = None
            refit = {
                "adapter": lora.UNET_ADAPTER,
                "rank": settings.rank,
                "weights": _unet_refit_map(staged.path / contracts["unet"].filename, base.unet),
            }
        else:
            exact = ScaledUNet(base.unet, lora.UNET_ADAPTER).eval()
            with torch.no_grad():
                references = [exact(*case, torch.tensor([anneal(float(case[1][0]), eta)])) for case in cases]
            merged_scale = merge_scale(eta, info.configs["scheduler"])
            for layer in lora.lora_layers(base.unet, lora.UNET_ADAPTER).values():
                layer.set_scale(lora.UNET_ADAPTER, merged_scale)
                layer.merge(adapter_names=[lora.UNET_ADAPTER])
            unet = MergedUNet(base.unet).eval()
            parity["unet"] = _export(unet, contracts["unet"], staged.path, opset, cases)
            with torch.no_grad():
                differences = [
                    float((unet(*case) - reference).norm() / reference.norm())
                    for case, reference in zip(cases, references, strict=True)
                ]
            parity["unet"]["merged_vs_exact_rel_l2"] = max(differences)
            refit = None  # U is folded into the UNet's weights

        on_stage("exporting the VAE decoder")
        decoder = VaeDecoder(base.vae, info.scaling_factor).eval()
        parity["vae_decoder"] = _export(
            decoder, contracts["vae_decoder"], staged.path, opset, [(latents,), (latents[:1],)], cache, reused
        )

        files = sorted(entry.name for entry in staged.path.iterdir())
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "run": {
                "path": str(run_path),
                "image_sha256": run.manifest["image_sha256"],
                "settings": asdict(settings),
                "base_model": info.identity(),
            },
            "latent_shape": [info.latent_channels, side, side],
            "unet": {"mode": unet_mode, "merged_scale": merged_scale, "refit": refit},
            "networks": {name: contract.as_dict() for name, contract in contracts.items()},
            "files": {name: sha256_file(staged.path / name) for name in files},
            "parity": parity,
            "export": {
                "exporter": "torch.onnx (dynamo)",
                "opset": opset,
                "precision": "fp32",
                "reused": reused,
            },
            "versions": versions(),
        }
        staged.write_json(MANIFEST, manifest)
    return manifest


def _unet_refit_map(path: Path, unet: nn.Module) -> dict[str, dict[str, Any]]:
    """Where each of U's tensors is in the exported graph (what a TensorRT refit with another run's U needs)."""
    import onnx
    from onnx import numpy_helper

    initializers = {entry.name: entry for entry in onnx.load(str(path), load_external_data=False).graph.initializer}
    state = {key: tensor.numpy() for key, tensor in lora.adapter_state(unet, lora.UNET_ADAPTER).items()}
    return match_initializers(
        {name: tuple(entry.dims) for name, entry in initializers.items()},
        lambda name: numpy_helper.to_array(initializers[name], base_dir=str(path.parent)),
        state,
        lora.UNET_ADAPTER,
    )


def _export(
    module: nn.Module,
    contract: NetworkContract,
    directory: Path,
    opset: int,
    cases: Sequence[tuple[torch.Tensor, ...]],
    cache: GraphCache | None = None,
    reused: list[str] | None = None,
) -> dict[str, float]:
    """Export (from ``cache`` where it holds the graph, its name then added to ``reused``), then the worst case of the
    check against PyTorch (what the manifest records)."""
    names = [spec.name for spec in contract.inputs]
    feeds = {
        f"case_{index}": {name: value.numpy() for name, value in zip(names, case, strict=True)}
        for index, case in enumerate(cases)
    }
    checked = export_checked(
        module, contract, directory / contract.filename, opset, cache=cache, example=cases[0], cases=feeds, large=True
    )
    if checked.reused and reused is not None:
        reused.append(contract.name)
    results = checked.parity.values()
    return {
        "rel_l2": max(result["rel_l2"] for result in results),
        "max_abs": max(result["max_abs"] for result in results),
    }
