"""The PyTorch backend: the exact models on CPU or CUDA, numpy arrays in and out."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cfdeploy.backends import BACKENDS
from cfdeploy.bundle import TextLatentCache
from cfdeploy.checkpoints import load_cfclip, load_clip
from cfdeploy.devices import torch_device
from cfdeploy.errors import CfdeployError
from cfdeploy.models.clip_text import ClipText
from cfdeploy.models.mappers import FullTextMapper, LatentEditor, LevelsMapper
from cfdeploy.models.stylegan2 import Generator, mean_latent, truncate
from cfdeploy.tokenizer import ClipTokenizer
from cfdeploy.torchfiles import weights_sha256

# Reduced precision is for the generator only: the mappers' PixelNorm breaks in 16-bit floats.
# fp16 runs under autocast (convolutions and matmuls in fp16, reductions such as demodulation in fp32);
# bf16 runs a bf16 copy of the generator, the fastest form on CPUs with bf16 matrix units.
GENERATOR_PRECISIONS = BACKENDS["torch"].precisions
# torch.compile of the generator: "reduce-overhead" (inductor kernels replayed as CUDA graphs) on CUDA; on a CPU
# there are no CUDA graphs to replay, so the CPU gets inductor's "default" mode (its C++ kernels), the same code path
# without the graph trees.
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}


class TorchBackend:
    """Runs each stage of the edit with the PyTorch models; every method takes and returns numpy."""

    name = "torch"

    def __init__(
        self,
        generator: Generator,
        text_mapper: FullTextMapper,
        mapper: LevelsMapper,
        clip: ClipText | None = None,
        latent_avg: torch.Tensor | None = None,
        description: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graphs: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = torch_device(device)
        if precision not in GENERATOR_PRECISIONS:
            raise CfdeployError(f"unknown precision {precision!r} (expected {', '.join(GENERATOR_PRECISIONS)})")
        if compile and cuda_graphs:
            raise CfdeployError(
                "--compile replays CUDA graphs itself (mode reduce-overhead): give --compile or --cuda-graphs"
            )
        if cuda_graphs and self.device.type != "cuda":
            raise CfdeployError("CUDA graphs need --device cuda")
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._generator_gpu_ms = 0.0
        self.generator = generator.eval().to(self.device)
        self._bf16_generator = copy.deepcopy(self.generator).to(torch.bfloat16) if precision == "bf16" else None
        self.compile_mode = COMPILE_MODES[self.device.type] if compile else None
        self._compiled: torch.nn.Module | None = None
        if self.compile_mode is not None:
            module = self._bf16_generator if self._bf16_generator is not None else self.generator
            self._compiled = torch.compile(module, mode=self.compile_mode, fullgraph=True, dynamic=False)  # type: ignore[assignment]
        self._compiled_batches: set[int] = set()
        self._compile_s = 0.0
        self.text_mapper = text_mapper.eval().to(self.device)
        self.editor = LatentEditor(mapper).eval().to(self.device)
        self.clip = clip.eval().to(self.device) if clip is not None else None
        self._tokenizer: ClipTokenizer | None = None
        self._latent_avg = latent_avg
        self.description = description
        self.source_text: str | None = None
        self.text_cache: TextLatentCache | None = None  # checkpoints have no prompt cache; bundles do
        self.encoder: torch.nn.Module | None = None
        self.encoder_generator_sha256: str | None = None
        self.identity: torch.nn.Module | None = None
        self.identity_source: str | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Path,
        clip_weights: Path | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graphs: bool = False,
        encoder: Path | None = None,
        compile: bool = False,
        identity_weights: Path | None = None,
    ) -> TorchBackend:
        """The CF-CLIP checkpoint's models; CLIP's text tower from ``clip_weights``, e4e from ``encoder`` (photos),
        ArcFace from ``identity_weights`` (identity scores)."""
        torch_device(device)
        loaded = load_cfclip(checkpoint)
        clip = load_clip(clip_weights) if clip_weights is not None else None
        inverter = None
        if encoder is not None:
            from cfdeploy.checkpoints import load_e4e

            inverter = load_e4e(encoder)
        backend = cls(
            loaded.generator,
            loaded.text_mapper,
            loaded.mapper,
            clip,
            None,
            loaded.description,
            device,
            precision,
            cuda_graphs,
            compile,
        )
        backend.source_text = loaded.source_text
        if inverter is not None:
            backend.encoder = inverter.encoder.eval().to(backend.device)
            backend.encoder_generator_sha256 = inverter.generator_sha256()
        if identity_weights is not None:
            from cfdeploy.checkpoints import load_arcface
            from cfdeploy.models.arcface import IdentityNetwork

            backend.identity = IdentityNetwork(load_arcface(identity_weights)).eval().to(backend.device)
            backend.identity_source = str(identity_weights)
        return backend

    def generator_sha256(self) -> str:
        """Hash of the generator weights (what bundles record; compared with the encoder's own generator)."""
        return weights_sha256(self.generator.state_dict())

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Aligned photos ``[B, 3, 256, 256]`` in [-1, 1] to W+ codes, with the e4e encoder (``--encoder``)."""
        if self.encoder is None:
            raise CfdeployError("encoding photos needs the e4e encoder: pass --encoder e4e_ffhq_encode.pt")
        return self._run(self.encoder, np.ascontiguousarray(images, np.float32))

    def identity_features(self, faces: np.ndarray) -> np.ndarray:
        """Faces at 256 px ``[B, 3, 256, 256]`` in [-1, 1] to unit ArcFace embeddings (``--identity-weights``)."""
        if self.identity is None:
            raise CfdeployError("identity scores need ArcFace: pass --identity-weights model_ir_se50.pth")
        return self._run(self.identity, np.ascontiguousarray(faces, np.float32))

    @property
    def size(self) -> int:
        return self.generator.config.size

    @property
    def n_latent(self) -> int:
        return self.generator.config.n_latent

    @property
    def style_dim(self) -> int:
        return self.generator.config.style_dim

    def _tensor(self, array: np.ndarray, dtype: type | None = None) -> torch.Tensor:
        """A numpy array on the backend's device (copied only if not contiguous, writable or of ``dtype``)."""
        return torch.from_numpy(np.require(array, dtype, ["C", "W"])).to(self.device)

    def _run(self, module: torch.nn.Module, *inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = module(*(self._tensor(x) for x in inputs))
        return output.float().cpu().numpy()

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer()
        return self._tokenizer(prompts)

    def text_features(self, tokens: np.ndarray) -> np.ndarray:
        if self.clip is None:
            raise CfdeployError("encoding a prompt needs CLIP weights (--clip-weights), or pass --text-embedding")
        return self._run(self.clip, tokens)

    def text_latents(self, text_features: np.ndarray) -> np.ndarray:
        return self._run(self.text_mapper, text_features)

    def edit_latents(self, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray:
        return self._run(self.editor, w, np.broadcast_to(text_latents, w.shape), np.array([strength], np.float32))

    def _generate(self, latents: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            return self._compiled_generate(latents)
        if self._bf16_generator is not None:
            return self._bf16_generator(latents.to(torch.bfloat16))
        if self.precision == "fp16":
            with torch.autocast(self.device.type, dtype=torch.float16):
                return self.generator(latents)
        return self.generator(latents)

    def _compiled_generate(self, latents: torch.Tensor) -> torch.Tensor:
        """The compiled generator; a batch size's first call compiles (and, on CUDA, records the graphs): its wall
        time goes to :meth:`compile_s`. The output is cloned, as CUDA graph trees reuse their output memory."""
        assert self._compiled is not None
        first = latents.shape[0] not in self._compiled_batches
        started = time.perf_counter()
        calls = 3 if first and self.device.type == "cuda" else 1  # reduce-overhead records its graphs on the 3rd call
        for _ in range(calls):
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            if self._bf16_generator is not None:
                image = self._compiled(latents.to(torch.bfloat16))
            elif self.precision == "fp16":
                with torch.autocast(self.device.type, dtype=torch.float16):
                    image = self._compiled(latents)
            else:
                image = self._compiled(latents)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._compile_s += time.perf_counter() - started
            self._compiled_batches.add(latents.shape[0])
        return image.clone()

    def compile_s(self) -> float:
        """Seconds spent compiling the generator (each batch size's first call); 0 without ``compile``."""
        return self._compile_s

    def _replay(self, latents: torch.Tensor) -> torch.Tensor:
        """The generator as a CUDA graph per batch size: captured after two warm-up runs, then replayed."""
        batch = latents.shape[0]
        if batch not in self._graphs:
            static_input = latents.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._generate(static_input)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._generate(static_input)
            self._graphs[batch] = (graph, static_input, static_output)
        graph, static_input, static_output = self._graphs[batch]
        static_input.copy_(latents)
        graph.replay()
        return static_output

    def synthesize(self, latents: np.ndarray) -> np.ndarray:
        """The generator in the backend's precision, replayed as a CUDA graph if asked; GPU time from events."""
        with torch.inference_mode():
            inputs = self._tensor(latents, np.float32)
            if self.device.type != "cuda":
                return self._generate(inputs).float().numpy()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            image = self._replay(inputs) if self.cuda_graphs else self._generate(inputs)
            end.record()
            end.synchronize()
            self._generator_gpu_ms += start.elapsed_time(end)
            return image.float().cpu().numpy()

    def device_ms(self) -> dict[str, float]:
        """GPU time of the generator since the backend was made (CUDA events); empty on CPU."""
        return {"generator": self._generator_gpu_ms} if self.device.type == "cuda" else {}

    def sample_w(self, z: np.ndarray, truncation: float) -> np.ndarray:
        """``z → w`` through the mapping network, truncated toward the mean W."""
        with torch.inference_mode():
            w = self.generator.mapping(torch.from_numpy(z).to(self.device))
            if truncation != 1.0:
                w = truncate(w, self.mean_w(), truncation)
        return w.cpu().numpy()

    def mean_w(self) -> torch.Tensor:
        """The checkpoint's ``latent_avg`` if it has one, else the mean of 4096 seeded mapped codes."""
        if self._latent_avg is None:
            self._latent_avg = mean_latent(self.generator)
        return self._latent_avg.to(self.device)
