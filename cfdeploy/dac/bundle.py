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

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfdeploy.bundle import sha256_file
from cfdeploy.contracts import NetworkContract, dac_contracts
from cfdeploy.dac.plms import PlmsScheduler, anneal, noise_latents
from cfdeploy.dac.refit_map import refit_weights
from cfdeploy.dac.run import (
    DESCRIBED_SETTINGS,
    MANIFEST,
    UNET_LORA,
    AbductSettings,
    read_edit_embeddings,
    read_run,
    read_tensors,
)
from cfdeploy.dac.torch_randn import aten_cpu_kernel
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
BUNDLE_BACKENDS = ("onnxruntime", "tensorrt")


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

    @property
    def contracts(self) -> dict[str, NetworkContract]:
        """The graphs' contracts, as this cfdeploy states them; a bundle that records others is refused."""
        channels, side, _ = self.latent_shape
        hidden = int(self.array(EMBEDDINGS).shape[-1])
        contracts = dac_contracts(channels, side, self.settings.resolution, hidden, self.unet_mode == "scale-input")
        if {name: contract.as_dict() for name, contract in contracts.items()} != self.manifest.get("networks"):
            raise CfdeployError(f"{self.path / MANIFEST}: its network contracts differ from this cfdeploy's (another version?)")
        return contracts

    def graph_sha256(self, network: str) -> str:
        """One digest of a graph and its weights file (the .onnx alone does not change with the weights)."""
        files = self.manifest["files"]
        parts = [files[f"{network}.onnx"], files.get(f"{network}.onnx.data", "")]
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    def array(self, name: str) -> np.ndarray:
        array: np.ndarray = np.load(self.path / name, allow_pickle=False)
        return array

    def scheduler_config(self) -> dict[str, Any]:
        return read_json_object(self.path / SCHEDULER_CONFIG, "a scheduler config")


def cuda_index(device: str) -> int | None:
    """``--device`` parsed: None for cpu, N for cuda / cuda:N; anything else refused."""
    if device == "cpu":
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise CfdeployError(f"unsupported device {device!r} (expected cpu, cuda or cuda:N)")
    return int(match.group(1) or 0)


def device_providers(device: str) -> tuple[list[str], list[dict[str, str]]]:
    """ONNX Runtime's providers and their options for ``--device``: cpu, or cuda / cuda:N on that GPU."""
    import onnxruntime as ort

    index = cuda_index(device)
    if index is None:
        return ["CPUExecutionProvider"], [{}]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise CfdeployError(f"--device {device}: this ONNX Runtime has no CUDA provider (has {', '.join(available)}); "
                            "install onnxruntime-gpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": str(index)}, {}]


class OnnxRuntimeNetworks:
    """The bundle's graphs as ONNX Runtime sessions on the CPU or one CUDA GPU: ``networks(name, **inputs)``.

    ``unet_weights`` (another run's U, by initializer name) replace the UNet graph's own, as a TensorRT refit does.
    """

    def __init__(self, bundle: DacBundle, device: str = "cpu", unet_weights: dict[str, np.ndarray] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        from cfdeploy.backends.onnxruntime_backend import load_failure

        providers, provider_options = device_providers(device)
        self.device = device
        self.sessions = {}
        # another run's U, by initializer name; ONNX Runtime reads these values, so they are kept alive here
        self._replaced = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in (unet_weights or {}).items()}
        for name in NETWORKS:
            path = bundle.path / f"{name}.onnx"
            options = ort.SessionOptions()
            options.log_severity_level = 3  # the exporter's CastLike nodes make the CPU provider warn about constant folding
            if threads:
                options.intra_op_num_threads = threads
            for initializer, value in (self._replaced.items() if name == "unet" else ()):
                options.add_initializer(initializer, value)
            try:
                session = ort.InferenceSession(str(path), options, providers=providers, provider_options=provider_options)
            except Exception as error:  # ONNX Runtime has one exception class per failure, none shared but Exception
                raise CfdeployError(f"{path}: ONNX Runtime cannot load this graph: {load_failure(error)}") from None
            if session.get_providers()[0] != providers[0]:
                raise CfdeployError(f"--device {device}: ONNX Runtime could not start {providers[0]} (its CUDA libraries?)")
            self.sessions[name] = session

    def describe(self) -> dict[str, Any]:
        return {"backend": "onnxruntime", "device": self.device, "providers": self.sessions["unet"].get_providers()}

    def __call__(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        output: np.ndarray = self.sessions[network].run(None, inputs)[0]
        return output


class BundleSampler:
    """Samples an edit with numpy's PLMS; ``networks(name, **inputs)`` runs the graphs (ONNX Runtime or TensorRT).

    ``eta`` is the sampled run's annealing; ``context`` its embeddings when another run's U has been refitted into
    the networks (by default the bundle's own, at ``settings.beta``).
    """

    def __init__(self, bundle: DacBundle, settings: PredictSettings, networks: Callable[..., np.ndarray], eta: float,
                 context: np.ndarray | None = None) -> None:
        if settings.scheduler != "pndm":
            raise CfdeployError(f"--scheduler {settings.scheduler}: a bundle samples with the base model's PNDM scheduler only")
        self.bundle = bundle
        self.settings = settings
        self.networks = networks
        self.context = self.embeddings(settings.beta) if context is None else context
        self.eta = eta

    def embeddings(self, beta: float) -> np.ndarray:
        """(uncond, cond) ``[2, 77, D]`` with Δ at −β: the shipped ones at β = 1, else from the text encoder graph."""
        if beta == 1.0:
            return self.bundle.array(EMBEDDINGS)
        return self.networks("text_encoder", tokens=self.bundle.array(TOKENS), text_lora_scale=np.array([-beta], np.float32))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.bundle.latent_shape

    def seeded_latents(self, seed: int) -> tuple[np.ndarray, str]:
        channels, side, _ = self.bundle.latent_shape
        return noise_latents(seed, channels, side), f"torch.Generator(cpu) seed {seed} (numpy, ATen's {aten_cpu_kernel()} kernel)"

    def sample(self, latents: np.ndarray, on_call: Callable[[int], None]) -> np.ndarray:
        scheduler = PlmsScheduler(self.bundle.scheduler_config())
        for timestep in scheduler.set_timesteps(self.settings.steps):
            on_call(int(timestep))
            feed = {"sample": np.concatenate([latents, latents]), "timestep": np.array([timestep], np.float32),
                    "encoder_hidden_states": self.context}
            if self.bundle.unet_mode == "scale-input":
                feed["lora_scale"] = np.array([anneal(int(timestep), self.eta)], np.float32)
            noise_uncond, noise_cond = self.networks("unet", **feed)
            noise = noise_uncond + self.settings.guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise[None], int(timestep), latents)
        image = self.networks("vae_decoder", latents=latents)
        unit: np.ndarray = np.clip(image / 2 + 0.5, 0, 1)
        return unit


def refit_inputs(bundle: DacBundle, run_path: Path, settings: PredictSettings) -> tuple[AbductSettings, dict[str, np.ndarray], np.ndarray]:
    """Another run's settings, U as engine weights for the bundle's UNet, and its stored embeddings (uncond, cond)."""
    refit = bundle.manifest["unet"].get("refit")
    if bundle.unet_mode != "scale-input" or not isinstance(refit, dict) or not isinstance(refit.get("weights"), dict):
        raise CfdeployError(f"{bundle.path}: its UNet has U merged in; a refit with another run's U needs a scale-input bundle")
    run = read_run(run_path)
    recorded = bundle.manifest["run"].get("base_model")
    if not isinstance(recorded, dict) or run.manifest["base_model"].get("weights_sha256") != recorded.get("weights_sha256"):
        raise CfdeployError(f"{run_path}: was fitted to another base model than {bundle.path}'s")
    if settings.beta != 1.0:
        raise CfdeployError(f"--run samples {run_path}'s stored embeddings (β 1); for --beta {settings.beta} export that run")
    unet_lora, _ = read_tensors(run.file(UNET_LORA))
    weights = refit_weights(refit["weights"], unet_lora, run.file(UNET_LORA))
    hidden = bundle.array(EMBEDDINGS).shape[1:]
    cond, uncond = read_edit_embeddings(run, (1, *hidden))
    return run.settings, weights, np.concatenate([uncond, cond])


def open_bundle(
    path: Path, settings: PredictSettings, device: str | None, on_stage: Callable[[str], None], backend: str = "onnxruntime",
    refit_run: Path | None = None,
) -> tuple[BundleSampler, dict[str, Any]]:
    """A sampler for the bundle at ``path`` (sampling ``refit_run`` instead, its U in place of the bundle's), and
    what ``edit.json`` records of it."""
    if backend not in BUNDLE_BACKENDS:
        raise CfdeployError(f"--backend {backend}: a bundle runs on {' or '.join(BUNDLE_BACKENDS)}")
    on_stage("checking the bundle")
    bundle = DacBundle(path)
    sampled, weights, context = bundle.settings, None, None
    if refit_run is not None:
        sampled, weights, context = refit_inputs(bundle, refit_run, settings)
    on_stage("loading the graphs")
    networks: Any
    if backend == "tensorrt":
        from cfdeploy.dac.engines import TensorRTNetworks

        networks = TensorRTNetworks(bundle, device or "cuda", weights)
    else:
        networks = OnnxRuntimeNetworks(bundle, device or "cpu", weights)
    sampler = BundleSampler(bundle, settings, networks, sampled.eta, context)
    return sampler, {"bundle": str(path), **networks.describe(), "unet_mode": bundle.unet_mode, "refit_run": str(refit_run) if refit_run else None,
                     **{key: getattr(sampled, key) for key in DESCRIBED_SETTINGS}}
