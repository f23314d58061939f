"""A DAC bundle (``cfdeploy dac export``) and its torch-free runtime on ONNX Runtime.

    BUNDLE/text_encoder.onnx(.data)  tokens, text_lora_scale (Δ's weight, −β) → hidden states
    BUNDLE/unet.onnx(.data)          sample, timestep, encoder_hidden_states[, lora_scale (γ(t))] → noise
    BUNDLE/vae_decoder.onnx(.data)   latents → image in about [-1, 1]
    BUNDLE/tokens.npy                token ids of "" and P′ [2, 77]
    BUNDLE/edit_embeddings.npy       their hidden states at β = 1 [2, 77, D] (uncond, cond)
    BUNDLE/scheduler_config.json     the base model's scheduler (PLMS in numpy)
    BUNDLE/manifest.json             the run's identity, contracts, sha256 of every file, export parity

Opening a bundle checks its manifest as CF-CLIP's bundles are checked (bounded, pinnable with ``expect_manifest``, every
path confined to the bundle); each file is checked against its sha256 when first used, and the bytes that were hashed
are the bytes used (graphs and their external weights go to ONNX Runtime from memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.bundle_files import (
    VerifiedFiles,
    VerifiedGraph,
    check_file_table,
    read_manifest,
    show,
)
from cfdeploy.contracts import NetworkContract, dac_contracts
from cfdeploy.dac.plms import PlmsScheduler, anneal, noise_latents
from cfdeploy.dac.refit_map import check_refit_map, refit_weights, require_initializers
from cfdeploy.dac.run import (
    MANIFEST,
    UNET_LORA,
    AbductSettings,
    read_edit_embeddings,
    read_run,
)
from cfdeploy.dac.sampling import PredictSettings
from cfdeploy.dac.torch_randn import aten_cpu_kernel
from cfdeploy.errors import CfdeployError
from cfdeploy.files import npy_from_bytes, read_tensors
from cfdeploy.sessions import Sessions

BUNDLE_FORMAT = "cfdeploy-dac-bundle"
FORMAT_VERSION = 1
TOKENS = "tokens.npy"
EMBEDDINGS = "edit_embeddings.npy"
SCHEDULER_CONFIG = "scheduler_config.json"
NETWORKS = ("text_encoder", "unet", "vae_decoder")
UNET_MODES = ("scale-input", "merged")
BUNDLE_BACKENDS = ("onnxruntime", "tensorrt")
MAX_ARRAY_BYTES = 64 << 20  # tokens [2, 77] and embeddings [2, 77, 1024] are a few hundred KB
MAX_CONFIG_BYTES = 1 << 20


class DacBundle:
    """An opened DAC bundle: manifest checked (and pinned, with ``expect_manifest``); files verified on first use."""

    def __init__(self, path: Path, expect_manifest: str | None = None) -> None:
        self.path = path
        manifest_path = path / MANIFEST
        manifest, self.manifest_sha256 = read_manifest(
            path, MANIFEST, "a cfdeploy DAC bundle", "make one with cfdeploy dac export", expect_manifest
        )
        if manifest.get("format") != BUNDLE_FORMAT:
            raise CfdeployError(
                f"{manifest_path}: not a cfdeploy DAC bundle manifest (format {show(manifest.get('format'))})"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CfdeployError(
                f"{manifest_path}: format version {show(manifest.get('format_version'))}, this cfdeploy reads {FORMAT_VERSION}"
            )
        files = check_file_table(path, manifest.get("files"), manifest_path)
        expected = {TOKENS, EMBEDDINGS, SCHEDULER_CONFIG, *(f"{name}.onnx" for name in NETWORKS)}
        missing = sorted(expected - set(files))
        if missing:
            raise CfdeployError(f"{manifest_path}: does not list {', '.join(missing)}")
        if MANIFEST in files:
            raise CfdeployError(f"{manifest_path}: lists itself, which no manifest can hash")
        self.manifest = manifest
        self.files = VerifiedFiles(path, MANIFEST, files)
        run = manifest.get("run")
        self.settings = AbductSettings.from_manifest(
            run.get("settings") if isinstance(run, dict) else None, manifest_path
        )
        latent_shape = manifest.get("latent_shape")
        if not (
            isinstance(latent_shape, list)
            and len(latent_shape) == 3
            and all(type(value) is int and 0 < value <= 4096 for value in latent_shape)
        ):
            raise CfdeployError(
                f"{manifest_path}: latent_shape is {show(latent_shape)}, expected [channels, side, side] of positive integers"
            )
        self.latent_shape: tuple[int, ...] = tuple(latent_shape)
        unet = manifest.get("unet")
        self.unet_mode = unet.get("mode") if isinstance(unet, dict) else None
        if self.unet_mode not in UNET_MODES:
            raise CfdeployError(
                f"{manifest_path}: unet.mode is {show(self.unet_mode)}, expected one of {', '.join(UNET_MODES)}"
            )

    @property
    def contracts(self) -> dict[str, NetworkContract]:
        """The graphs' contracts, as this cfdeploy states them; a bundle that records others is refused."""
        channels, side, _ = self.latent_shape
        hidden = int(self.array(EMBEDDINGS).shape[-1])
        contracts = dac_contracts(channels, side, self.settings.resolution, hidden, self.unet_mode == "scale-input")
        if {name: contract.as_dict() for name, contract in contracts.items()} != self.manifest.get("networks"):
            raise CfdeployError(
                f"{self.path / MANIFEST}: its network contracts differ from this cfdeploy's (another version?)"
            )
        return contracts

    def graph_sha256(self, network: str) -> str:
        """What a graph's engines are keyed on: :meth:`VerifiedFiles.graph_digest`."""
        return self.files.graph_digest(f"{network}.onnx")

    def graph(self, network: str) -> VerifiedGraph:
        return self.files.graph(f"{network}.onnx")

    def array(self, name: str) -> np.ndarray:
        return npy_from_bytes(self.files.read_bytes(name, MAX_ARRAY_BYTES), str(self.path / name))

    def scheduler_config(self) -> dict[str, Any]:
        content = self.files.read_bytes(SCHEDULER_CONFIG, MAX_CONFIG_BYTES)
        try:
            config = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise CfdeployError(f"{self.path / SCHEDULER_CONFIG}: not a JSON scheduler config ({error})") from None
        if not isinstance(config, dict):
            raise CfdeployError(
                f"{self.path / SCHEDULER_CONFIG}: expected a JSON object, found {type(config).__name__}"
            )
        return config


def onnxruntime_networks(
    bundle: DacBundle,
    device: str = "cpu",
    unet_weights: dict[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> Sessions:
    """The bundle's graphs as ONNX Runtime sessions; ``unet_weights`` (another run's U, by initializer name) replace
    the UNet graph's own, as a TensorRT refit does, each checked to be in the graph (the bytes loaded, not a re-read)."""

    def graph(network: str) -> VerifiedGraph:
        loaded = bundle.graph(network)
        if network == "unet" and unet_weights:
            require_initializers(unet_weights, loaded.content, loaded.path, bundle.path / MANIFEST)
        return loaded

    return Sessions(graph, device, threads=threads, initializers={"unet": unet_weights} if unet_weights else None)


class BundleSampler:
    """Samples an edit with numpy's PLMS; ``networks(name, **inputs)`` runs the graphs (ONNX Runtime or TensorRT).

    ``eta`` is the sampled run's annealing; ``context`` its embeddings when another run's U has been refitted into
    the networks (by default the bundle's own, at ``settings.beta``).
    """

    def __init__(
        self,
        bundle: DacBundle,
        settings: PredictSettings,
        networks: Callable[..., np.ndarray],
        eta: float,
        context: np.ndarray | None = None,
    ) -> None:
        if settings.scheduler != "pndm":
            raise CfdeployError(
                f"--scheduler {settings.scheduler}: a bundle samples with the base model's PNDM scheduler only"
            )
        self.bundle = bundle
        self.settings = settings
        self.networks = networks
        self.context = self.embeddings(settings.beta) if context is None else context
        self.eta = eta

    def embeddings(self, beta: float) -> np.ndarray:
        """(uncond, cond) ``[2, 77, D]`` with Δ at −β: the shipped ones at β = 1, else from the text encoder graph."""
        if beta == 1.0:
            return self.bundle.array(EMBEDDINGS)
        return self.networks(
            "text_encoder", tokens=self.bundle.array(TOKENS), text_lora_scale=np.array([-beta], np.float32)
        )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.bundle.latent_shape

    def seeded_latents(self, seed: int) -> tuple[np.ndarray, str]:
        channels, side, _ = self.bundle.latent_shape
        return noise_latents(
            seed, channels, side
        ), f"torch.Generator(cpu) seed {seed} (numpy, ATen's {aten_cpu_kernel()} kernel)"

    def sample(self, latents: np.ndarray, on_call: Callable[[int], None]) -> np.ndarray:
        scheduler = PlmsScheduler(self.bundle.scheduler_config())
        for timestep in scheduler.set_timesteps(self.settings.steps):
            on_call(int(timestep))
            feed = {
                "sample": np.concatenate([latents, latents]),
                "timestep": np.array([timestep], np.float32),
                "encoder_hidden_states": self.context,
            }
            if self.bundle.unet_mode == "scale-input":
                feed["lora_scale"] = np.array([anneal(int(timestep), self.eta)], np.float32)
            noise_uncond, noise_cond = self.networks("unet", **feed)
            noise = noise_uncond + self.settings.guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise[None], int(timestep), latents)
        image = self.networks("vae_decoder", latents=latents)
        unit: np.ndarray = np.clip(image / 2 + 0.5, 0, 1)
        return unit


def refit_inputs(
    bundle: DacBundle, run_path: Path, settings: PredictSettings
) -> tuple[AbductSettings, dict[str, np.ndarray], np.ndarray]:
    """Another run's settings, U as engine weights for the bundle's UNet, and its stored embeddings (uncond, cond)."""
    refit = bundle.manifest["unet"].get("refit")
    if bundle.unet_mode != "scale-input" or not isinstance(refit, dict) or not isinstance(refit.get("weights"), dict):
        raise CfdeployError(
            f"{bundle.path}: its UNet has U merged in; a refit with another run's U needs a scale-input bundle"
        )
    run = read_run(run_path)
    recorded = bundle.manifest["run"].get("base_model")
    if not isinstance(recorded, dict) or run.manifest["base_model"].get("files_sha256") != recorded.get("files_sha256"):
        raise CfdeployError(f"{run_path}: was fitted to another base model than {bundle.path}'s")
    if settings.beta != 1.0:
        raise CfdeployError(
            f"--run samples {run_path}'s stored embeddings (β 1); for --beta {settings.beta} export that run"
        )
    check_refit_map(refit["weights"], bundle.path / MANIFEST)
    unet_lora, _ = read_tensors(run.file(UNET_LORA))
    weights = refit_weights(refit["weights"], unet_lora, run.file(UNET_LORA))
    hidden = bundle.array(EMBEDDINGS).shape[1:]
    cond, uncond = read_edit_embeddings(run, (1, *hidden))
    return run.settings, weights, np.concatenate([uncond, cond])
