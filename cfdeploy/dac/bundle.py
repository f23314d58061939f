"""A DAC bundle (``cfdeploy dac export``) and its torch-free runtime on ONNX Runtime.

    BUNDLE/text_encoder.onnx(.data)  tokens, text_lora_scale (Δ's weight, −β) → hidden states
    BUNDLE/unet.onnx(.data)          sample, timestep, encoder_hidden_states[, lora_scale (γ(t))] → noise
    BUNDLE/vae_decoder.onnx(.data)   latents → image in about [-1, 1]
    BUNDLE/tokens.npy                token ids of "" and P′ [2, 77]
    BUNDLE/edit_embeddings.npy       their hidden states at β = 1 [2, 77, D] (uncond, cond)
    BUNDLE/scheduler_config.json     the base model's scheduler (PLMS in numpy)
    BUNDLE/manifest.json             the run's identity, contracts, sha256 of every file, export parity

Opening a bundle checks the manifest and every file's sha256 before anything is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfdeploy.bundle import sha256_file
from cfdeploy.dac.plms import PlmsScheduler, anneal, noise_latents
from cfdeploy.dac.run import DESCRIBED_SETTINGS, MANIFEST, AbductSettings
from cfdeploy.errors import CfdeployError
from cfdeploy.inputs import read_json_object

if TYPE_CHECKING:
    from cfdeploy.dac.edits import PredictSettings

BUNDLE_FORMAT = "cfdeploy-dac-bundle"
FORMAT_VERSION = 1
TOKENS = "tokens.npy"
EMBEDDINGS = "edit_embeddings.npy"
SCHEDULER_CONFIG = "scheduler_config.json"
NETWORKS = ("text_encoder", "unet", "vae_decoder")
UNET_MODES = ("scale-input", "merged")


class DacBundle:
    """An opened DAC bundle: manifest checked, every listed file present and matching its sha256."""

    def __init__(self, path: Path) -> None:
        self.path = path
        manifest_path = path / MANIFEST
        manifest = read_json_object(manifest_path, "a DAC bundle manifest")
        if manifest.get("format") != BUNDLE_FORMAT:
            raise CfdeployError(f"{manifest_path}: not a cfdeploy DAC bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CfdeployError(f"{manifest_path}: format version {manifest.get('format_version')!r}, this cfdeploy reads {FORMAT_VERSION}")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise CfdeployError(f"{manifest_path}: no 'files' table")
        expected = {TOKENS, EMBEDDINGS, SCHEDULER_CONFIG, *(f"{name}.onnx" for name in NETWORKS)}
        missing = sorted(expected - set(files))
        if missing:
            raise CfdeployError(f"{manifest_path}: does not list {', '.join(missing)}")
        for name, digest in files.items():
            if not isinstance(name, str) or "/" in name or name.startswith(".") or name == MANIFEST:
                raise CfdeployError(f"{manifest_path}: lists {name!r}, which is not a file name of a DAC bundle")
            file = path / name
            if not file.is_file() or file.is_symlink():
                raise CfdeployError(f"{file}: listed in the manifest but missing (or not a regular file)")
            if sha256_file(file) != digest:
                raise CfdeployError(f"{file}: its sha256 differs from the manifest's (damaged or altered)")
        self.manifest = manifest
        run = manifest.get("run")
        self.settings = AbductSettings.from_manifest(run.get("settings") if isinstance(run, dict) else None, manifest_path)
        latent_shape = manifest.get("latent_shape")
        if not (isinstance(latent_shape, list) and len(latent_shape) == 3
                and all(type(value) is int and 0 < value <= 4096 for value in latent_shape)):
            raise CfdeployError(f"{manifest_path}: latent_shape is {latent_shape!r}, expected [channels, side, side] of positive integers")
        self.latent_shape: tuple[int, ...] = tuple(latent_shape)
        unet = manifest.get("unet")
        self.unet_mode = unet.get("mode") if isinstance(unet, dict) else None
        if self.unet_mode not in UNET_MODES:
            raise CfdeployError(f"{manifest_path}: unet.mode is {self.unet_mode!r}, expected one of {', '.join(UNET_MODES)}")

    def array(self, name: str) -> np.ndarray:
        array: np.ndarray = np.load(self.path / name, allow_pickle=False)
        return array

    def scheduler_config(self) -> dict[str, Any]:
        return read_json_object(self.path / SCHEDULER_CONFIG, "a scheduler config")


def device_providers(device: str) -> tuple[list[str], list[dict[str, str]]]:
    """ONNX Runtime's providers and their options for ``--device``: cpu, or cuda / cuda:N on that GPU."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"], [{}]
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise CfdeployError(f"unsupported device {device!r} (expected cpu, cuda or cuda:N)")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise CfdeployError(f"--device {device}: this ONNX Runtime has no CUDA provider (has {', '.join(available)}); "
                            "install onnxruntime-gpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": match.group(1) or "0"}, {}]


class OnnxSampler:
    """Samples a bundle's edit with ONNX Runtime on the CPU or one CUDA GPU, and numpy's PLMS."""

    def __init__(self, bundle: DacBundle, settings: PredictSettings, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        from cfdeploy.backends.onnxruntime_backend import load_failure

        if settings.scheduler != "pndm":
            raise CfdeployError(f"--scheduler {settings.scheduler}: a bundle samples with the base model's PNDM scheduler only")
        self.bundle = bundle
        self.settings = settings
        providers, provider_options = device_providers(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the exporter's CastLike nodes make the CPU provider warn about constant folding
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for name in NETWORKS:
            path = bundle.path / f"{name}.onnx"
            try:
                session = ort.InferenceSession(str(path), options, providers=providers, provider_options=provider_options)
            except Exception as error:  # ONNX Runtime has one exception class per failure, none shared but Exception
                raise CfdeployError(f"{path}: ONNX Runtime cannot load this graph: {load_failure(error)}") from None
            if session.get_providers()[0] != providers[0]:
                raise CfdeployError(f"--device {device}: ONNX Runtime could not start {providers[0]} (its CUDA libraries?)")
            self.sessions[name] = session
        self.context = self.embeddings(settings.beta)

    def embeddings(self, beta: float) -> np.ndarray:
        """(uncond, cond) ``[2, 77, D]`` with Δ at −β: the shipped ones at β = 1, else from the text encoder graph."""
        if beta == 1.0:
            return self.bundle.array(EMBEDDINGS)
        tokens = self.bundle.array(TOKENS)
        hidden: np.ndarray = self.sessions["text_encoder"].run(
            None, {"tokens": tokens, "text_lora_scale": np.array([-beta], np.float32)})[0]
        return hidden

    def sample(self, seed: int, on_call: Callable[[int], None]) -> np.ndarray:
        channels, side, _ = self.bundle.latent_shape
        scheduler = PlmsScheduler(self.bundle.scheduler_config())
        latents = noise_latents(seed, channels, side)
        for timestep in scheduler.set_timesteps(self.settings.steps):
            on_call(int(timestep))
            feed = {"sample": np.concatenate([latents, latents]), "timestep": np.array([timestep], np.float32),
                    "encoder_hidden_states": self.context}
            if self.bundle.unet_mode == "scale-input":
                feed["lora_scale"] = np.array([anneal(int(timestep), self.bundle.settings.eta)], np.float32)
            noise_uncond, noise_cond = self.sessions["unet"].run(None, feed)[0]
            noise = noise_uncond + self.settings.guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise[None], int(timestep), latents)
        image: np.ndarray = self.sessions["vae_decoder"].run(None, {"latents": latents})[0]
        unit: np.ndarray = np.clip(image / 2 + 0.5, 0, 1)
        return unit


def open_bundle(path: Path, settings: PredictSettings, device: str, on_stage: Callable[[str], None]) -> tuple[OnnxSampler, dict[str, Any]]:
    """A sampler for the bundle at ``path``, and what ``edit.json`` records of it."""
    device_providers(device)
    on_stage("checking the bundle")
    bundle = DacBundle(path)
    on_stage("loading the graphs")
    sampler = OnnxSampler(bundle, settings, device)
    return sampler, {"bundle": str(path), "backend": "onnxruntime", "device": device,
                     "providers": sampler.sessions["unet"].get_providers(), "unet_mode": bundle.unet_mode,
                     **{key: getattr(bundle.settings, key) for key in DESCRIBED_SETTINGS}}
