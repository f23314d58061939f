"""``cfdeploy export``: turn a CF-CLIP checkpoint and CLIP weights (and an e4e encoder) into a verified ONNX bundle.

Each graph follows its contract in :mod:`cfdeploy.contracts`, is exported with a dynamic batch by
torch's ONNX exporter, cleaned by onnxslim (constant folding, dead nodes), and then
run by ONNX Runtime on fresh random inputs at batch 1 and 3 against the torch model; export fails if
any graph drifts past tolerance.

Exported graphs are kept in a per-user cache (:func:`export_cache`): a network whose weights, code, contract,
opset and exporter versions were exported before is reused instead of traced again. Official CF-CLIP checkpoints
of different prompts share the generator and CLIP, so a second prompt's bundle exports only its two mappers.
A reused graph is checked against torch like a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import inspect
import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxslim
import torch
from torch import nn

from cfdeploy.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MEAN_W,
    PROMPTS_DIR,
    TOKENIZER_VOCAB,
    prompt_file,
    write_manifest,
)
from cfdeploy.bundle_files import EXTERNAL_DATA_SUFFIX
from cfdeploy.checkpoints import load_arcface, load_cfclip, load_clip, load_e4e
from cfdeploy.contracts import BATCH, NetworkContract, TensorSpec, network_contracts
from cfdeploy.environment import package_version, versions
from cfdeploy.errors import CfdeployError
from cfdeploy.files import sha256_file
from cfdeploy.graph_cache import GraphCache, cache_root
from cfdeploy.models import layers
from cfdeploy.models.arcface import IdentityNetwork
from cfdeploy.models.layers import with_scaled_linears
from cfdeploy.models.mappers import LatentEditor
from cfdeploy.models.stylegan2 import mean_latent
from cfdeploy.outputs import StagedDirectory
from cfdeploy.sessions import Sessions
from cfdeploy.tokenizer import ClipTokenizer, packaged_vocab_path

DEFAULT_OPSET = 18
PARITY_BATCHES = (1, 3)
TRACE_BATCH = 2
PHOTO_WAVES = 8
MAX_BATCH = 1024
EXPORTS_DIR = "exports"  # under the cache root, beside the compiled graphs
EXPORTED_GRAPH = "graph.onnx"
EXPORTED_WEIGHTS = EXPORTED_GRAPH + EXTERNAL_DATA_SUFFIX  # a large graph's weights, beside it
EXPORTER_PACKAGES = ("torch", "onnx", "onnxscript", "onnxslim")


def photo_like(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Images ``[B, C, H, W]`` that span [-1, 1] as normalised photos do: smooth colour fields (sums of random
    waves) with a little pixel noise, rather than white noise."""
    batch, channels, height, width = shape
    rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    frequencies = rng.uniform(0, 6, size=(batch, channels, PHOTO_WAVES, 2, 1, 1))
    phases = rng.uniform(0, 2 * np.pi, size=(batch, channels, PHOTO_WAVES, 1, 1))
    field = np.cos(2 * np.pi * (frequencies[:, :, :, 0] * rows + frequencies[:, :, :, 1] * cols) + phases).sum(axis=2)
    image = np.tanh(field / 2) + 0.03 * rng.standard_normal(shape)
    return np.clip(image, -1, 1).astype(np.float32)


def sample_input(spec: TensorSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Fresh random input for one tensor of a contract (token rows end with a real end token, images look like
    photos)."""
    shape = tuple(batch if dim == BATCH else int(dim) for dim in spec.shape)
    if spec.name == "images":
        return photo_like(shape, rng)
    if spec.name == "tokens":
        tokens = np.zeros(shape, np.int64)
        for row in tokens:
            length = int(rng.integers(3, shape[1] + 1))
            row[0], row[length - 1] = 49406, 49407
            row[1 : length - 1] = rng.integers(1, 49406, size=length - 2)
        return tokens
    if spec.name == "strength":
        return rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    # Magnitudes from 1e-5 to 3: PixelNorm's epsilon only matters for small values, so test them too.
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-5.0, 0.5, size=shape)).astype(np.float32)


def release_freed_memory() -> None:
    """Free what reference cycles hold (onnxslim's graph is one) and hand the freed memory back to the system (glibc
    keeps freed heap for reuse; an export frees several copies of a network's weights at once, in blocks below its
    mmap threshold), so the parity check that follows does not stack its session on top of them. Where the C library
    is not glibc, only the first."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def export_cache() -> GraphCache:
    """The cache of exported graphs (``exports/`` under :func:`~cfdeploy.graph_cache.cache_root`), with the
    compiled-graph cache's checks: each file's sha256 recorded and checked, damaged entries refused and rebuilt."""
    return GraphCache(cache_root() / EXPORTS_DIR)


def module_sha256(module: nn.Module) -> str:
    """What tracing ``module`` depends on besides code: the class and plain settings of every submodule (an
    equalised layer's ``lr_mul``, a norm's ``eps``), and every parameter and buffer (name, dtype, shape, values)."""
    digest = hashlib.sha256()
    for name, submodule in module.named_modules():
        settings = sorted(
            (key, repr(value))
            for key, value in vars(submodule).items()
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, tuple, type(None)))
        )
        digest.update(json.dumps([name, type(submodule).__module__, type(submodule).__qualname__, settings]).encode())
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def code_sha256(module: nn.Module) -> str:
    """The source files of every class in ``module``, of this exporter and of the layers it swaps in."""
    files = {inspect.getsourcefile(type(submodule)) for submodule in module.modules()}
    files |= {__file__, inspect.getsourcefile(layers)}
    digest = hashlib.sha256()
    for file in sorted(name for name in files if name is not None):
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def export_parts(
    module: nn.Module,
    contract: NetworkContract,
    opset: int,
    example: tuple[torch.Tensor, ...] | None,
    large: bool = False,
) -> dict:
    """What an exported graph depends on: its cache entry's key is the hash of these parts."""
    return {
        "network": contract.name,
        "contract": {**contract.as_dict(), "dynamic_batch_max": MAX_BATCH},
        "opset": opset,
        "module_sha256": module_sha256(module),
        "code_sha256": code_sha256(module),
        "example_shapes": None if example is None else [list(tensor.shape) for tensor in example],
        "versions": {package: package_version(package) for package in EXPORTER_PACKAGES},
        **({"weights_beside": True} if large else {}),
    }


def export_graph(
    module: nn.Module,
    contract: NetworkContract,
    path: Path,
    opset: int,
    example: tuple[torch.Tensor, ...] | None = None,
    large: bool = False,
    cache: GraphCache | None = None,
) -> bool:
    """Export ``module`` to ``path`` under ``contract``'s names, traced on ``example`` (default: random inputs);
    returns whether the graph came from ``cache``.

    ``large``: weights beside the graph in ``<file>.data`` (protobuf stops at 2 GB, a Stable Diffusion UNet is
    larger), and the graph kept as the exporter wrote it (both files cached together).

    A refittable network (``contract.refittable``) keeps each weight as a graph initializer of its own, named by
    its module path, whatever its values: its equalised-lr layers are exported with their scales applied
    (:class:`ScaledLinear`) and onnxslim never sees the weights, so it cannot fold them into constants named by
    the op that made them (``mul_111``) nor merge equal ones (a new run's zero biases). Any checkpoint of the
    same architecture then gives a graph with the same initializers, which refit relies on.

    ``cache``: reuse the graph exported before from the same weights, code, contract and versions (see
    :func:`export_parts`), and keep a new one there. An entry without the files this layout needs is traced anew.
    """
    parts = None if cache is None else export_parts(module, contract, opset, example, large)
    weights_file = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    if cache is not None and parts is not None:
        cached = cache.load(contract.name, parts)
        if cached is not None and EXPORTED_GRAPH in cached and (EXPORTED_WEIGHTS in cached) == large:
            path.write_bytes(cached[EXPORTED_GRAPH])
            if large:
                weights_file.write_bytes(cached[EXPORTED_WEIGHTS])
            return True
    weights: tuple[str, ...] = ()
    batch = torch.export.Dim(BATCH, min=1, max=MAX_BATCH)
    rng = np.random.default_rng(0)
    args = example or tuple(torch.from_numpy(sample_input(spec, TRACE_BATCH, rng)) for spec in contract.inputs)
    dynamic = tuple({0: batch} if spec.shape[0] == BATCH else None for spec in contract.inputs)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        if contract.refittable and not large:
            module = with_scaled_linears(module)
            weights = tuple(name for name, _ in module.named_parameters())
        program = torch.onnx.export(
            module.eval(),
            args,
            str(path) if large else None,  # otherwise the graph goes on in memory, not through the disk
            input_names=[spec.name for spec in contract.inputs],
            output_names=[spec.name for spec in contract.outputs],
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            external_data=large,
            optimize=False,  # its optimizer drops PixelNorm's "+ 1e-8"; onnxslim below keeps it
            verbose=False,
        )
    if large:
        if cache is not None and parts is not None and weights_file.is_file():
            cache.put(parts, {EXPORTED_GRAPH: path, EXPORTED_WEIGHTS: weights_file})
        return False
    assert program is not None
    graph = program.model_proto
    drop_zero_conv_biases(graph)
    slimmed = slim_keeping(graph, weights, contract.name)
    del graph, program  # as large as the weights each: gone before the slimmed graph's bytes are made
    release_freed_memory()
    serialized = slimmed.SerializeToString()
    del slimmed
    path.write_bytes(serialized)
    if cache is not None and parts is not None:
        cache.put(parts, {EXPORTED_GRAPH: serialized})
    return False


def forget_onnxslim_matches() -> None:
    """onnxslim's fusion patterns are objects of its module that keep the nodes they matched last, and through them
    the graph those came from (protobuf frees a graph's memory only once no part of it is referenced): forgetting
    them lets the 600 MB encoder's graph go once it is slimmed. Nothing happens where onnxslim keeps them otherwise."""
    with contextlib.suppress(ImportError, AttributeError):
        from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

        for matchers in DEFAULT_FUSION_PATTERNS.values():
            for matcher in matchers:
                for name in getattr(matcher, "pattern_dict", {}):
                    vars(matcher).pop(name, None)


def slim_keeping(model: onnx.ModelProto, weights: Sequence[str], network: str) -> onnx.ModelProto:
    """onnxslim's graph (constant folding, dead nodes, merged duplicates) with the initializers named in ``weights``
    kept as they are: they are graph inputs while onnxslim runs, initializers again after. A weight no node reads (a
    mapper group with no levels at this size) is left out, as it is from every export of the same architecture."""
    kept = {tensor.name: tensor for tensor in model.graph.initializer if tensor.name in weights}
    missing = [name for name in weights if name not in kept]
    if missing:
        raise CfdeployError(f"{network}: the exporter did not keep weight {missing[0]} as an initializer of its own")
    others = [tensor for tensor in model.graph.initializer if tensor.name not in kept]
    del model.graph.initializer[:]
    model.graph.initializer.extend(others)
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims) for name, tensor in kept.items()
    )
    # The exporter already records the shapes; onnxslim's own shape inference adds nothing to the graph (the same
    # nodes come out) and takes half a minute on the 1 GB encoder.
    slimmed = onnxslim.slim(model, no_shape_infer=True)
    forget_onnxslim_matches()
    inputs = [value for value in slimmed.graph.input if value.name not in kept]
    del slimmed.graph.input[:]
    slimmed.graph.input.extend(inputs)
    used = {name for node in slimmed.graph.node for name in node.input}
    slimmed.graph.initializer.extend(tensor for name, tensor in kept.items() if name in used)
    return slimmed


def drop_zero_conv_biases(model: onnx.ModelProto) -> int:
    """Remove the bias input of convolutions whose bias the exporter builds at run time as zeros.

    torch's exporter gives a bias-free ``Conv`` (all 100 of e4e's IR-SE convolutions) a bias computed as
    ``Expand(CastLike(0, weight), shape)``. ONNX Runtime cannot fold that into its blocked (NCHWc) convolution
    kernels, so the encoder ran about 13% slower (batch 1 and 8, 2 CPU cores) than with no bias, which is what the model means.
    Returns how many were removed; onnxslim then deletes the unused nodes."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return onnx.numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return onnx.numpy_helper.to_array(node.attribute[0].t)
        return None

    def is_zero_fill(name: str) -> bool:
        expand = producers.get(name)
        if expand is None or expand.op_type != "Expand":
            return False
        cast = producers.get(expand.input[0])
        if cast is None or cast.op_type != "CastLike":
            return False
        value = constant(cast.input[0])
        return value is not None and value.size == 1 and not value.any()

    removed = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) == 3 and is_zero_fill(node.input[2]):
            del node.input[2]
            removed += 1
    return removed


def parity_cases(
    contract: NetworkContract, batches: Sequence[int] = PARITY_BATCHES
) -> dict[str, dict[str, np.ndarray]]:
    """Fresh random inputs for each batch size, as the contract describes them."""
    rng = np.random.default_rng(1234)
    return {
        f"batch_{batch}": {spec.name: sample_input(spec, batch, rng) for spec in contract.inputs} for batch in batches
    }


def check_parity(
    module: nn.Module,
    contract: NetworkContract,
    path: Path,
    cases: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """The exported graph in ONNX Runtime against ``module`` on each case (default: :func:`parity_cases`), by case;
    export fails where a case drifts past the contract's ``parity_rel_l2``. Both editors' exports check here."""
    sessions = Sessions(lambda name: path, "cpu")
    results = {}
    for label, inputs in (parity_cases(contract) if cases is None else cases).items():
        with torch.no_grad():
            expected = module(*(torch.from_numpy(value) for value in inputs.values())).numpy().astype(np.float64)
        got = sessions(contract.name, **inputs).astype(np.float64)
        if got.shape != expected.shape:
            raise CfdeployError(
                f"{contract.name}: exported graph gives shape {list(got.shape)}, torch {list(expected.shape)}"
            )
        rel_l2 = float(np.linalg.norm(got - expected)) / max(float(np.linalg.norm(expected)), 1e-30)
        results[label] = {"max_abs": float(np.abs(got - expected).max()), "rel_l2": rel_l2}
        if not rel_l2 <= contract.parity_rel_l2:
            raise CfdeployError(
                f"{contract.name}: ONNX graph differs from torch at {label.replace('_', ' ')}: "
                f"rel L2 {rel_l2:.2e} > {contract.parity_rel_l2:.0e}"
            )
    return results


@dataclass(frozen=True)
class CheckedExport:
    """A graph exported (or reused) and checked: its parity by case, whether it came from the cache, the times."""

    parity: dict[str, dict[str, float]]
    reused: bool
    export_s: float
    check_s: float


def export_checked(
    module: nn.Module,
    contract: NetworkContract,
    path: Path,
    opset: int,
    *,
    cache: GraphCache | None = None,
    example: tuple[torch.Tensor, ...] | None = None,
    cases: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    large: bool = False,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> CheckedExport:
    """:func:`export_graph`, then :func:`check_parity`. A graph reused from ``cache`` is checked like a new one; if
    it fails, it is exported afresh and its cache entry replaced (an entry intact by its hashes can still be wrong)."""
    started = time.perf_counter()
    reused = export_graph(module, contract, path, opset, example=example, large=large, cache=cache)
    exported = time.perf_counter()
    on_stage(f"checking {contract.name} against torch" + (" (reused from an earlier export)" if reused else ""))
    try:
        parity = check_parity(module, contract, path, cases)
    except Exception as failure:
        if not reused or cache is None:
            raise
        on_stage(f"the reused {contract.name} graph failed its check ({failure}); exporting it afresh")
        cache.discard(export_parts(module, contract, opset, example, large))
        export_graph(module, contract, path, opset, example=example, large=large, cache=cache)
        parity = check_parity(module, contract, path, cases)
        reused = False
    return CheckedExport(parity, reused, exported - started, time.perf_counter() - exported)


def export_bundle(
    checkpoint_path: Path,
    clip_weights: Path | None,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    prompts: Sequence[str] = (),
    force: bool = False,
    include_clip_text: bool = True,
    encoder: Path | None = None,
    identity_weights: Path | None = None,
    reuse_exports: bool = True,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict:
    """Write a bundle to ``out`` (atomically) and return its manifest.

    With ``reuse_exports`` a graph found in :func:`export_cache` is reused (the manifest lists it under
    ``export.reused``) and each new one is kept there.

    Without ``include_clip_text`` the bundle has no CLIP graph: it edits only the ``prompts``
    precomputed here, or given text features. With ``encoder`` (an e4e checkpoint) it also has the
    ``encoder`` graph, photos to W+; the manifest records the hash of the generator e4e was trained
    against (``weights.encoder_generator_sha256``), to compare with ``weights.generator_sha256``.
    With ``identity_weights`` (ArcFace IR-SE-50) it also has the ``identity`` graph, which scores edits.
    ``clip_weights`` may be None only without ``include_clip_text`` and ``prompts``: such a bundle edits
    only with given text features (``--text-embedding``).
    """
    needs_clip = include_clip_text or bool(prompts)
    if needs_clip and clip_weights is None:
        raise CfdeployError(
            "CLIP weights are needed for the CLIP text graph and for precomputed prompts: pass --clip-weights "
            "(or --without-clip and no --prompt, for a bundle used only with --text-embedding)"
        )
    on_stage(
        "loading checkpoint and CLIP weights" if encoder is None else "loading checkpoint, CLIP weights and encoder"
    )
    checkpoint = load_cfclip(checkpoint_path)
    generator = checkpoint.generator
    config = generator.config
    e4e = None if encoder is None else load_e4e(encoder)
    if e4e is not None and (e4e.n_latent, e4e.style_dim) != (config.n_latent, config.style_dim):
        raise CfdeployError(
            f"{encoder}: the encoder makes W+ codes of {e4e.n_latent} levels x {e4e.style_dim}, the CF-CLIP generator of "
            f"{checkpoint_path} takes {config.n_latent} x {config.style_dim}"
        )
    clip = load_clip(clip_weights) if needs_clip and clip_weights is not None else None
    arcface = None if identity_weights is None else load_arcface(identity_weights)
    contracts = {
        name: contract
        for name, contract in network_contracts(
            config.size,
            config.n_latent,
            config.style_dim,
            with_encoder=e4e is not None,
            with_identity=arcface is not None,
        ).items()
        if include_clip_text or name != "clip_text"
    }
    modules: dict[str, nn.Module] = {
        **({} if e4e is None else {"encoder": e4e.encoder}),
        **({} if clip is None else {"clip_text": clip}),
        "text_mapper": checkpoint.text_mapper,
        "latent_editor": LatentEditor(checkpoint.mapper),
        "generator": generator,
        "mapping": generator.style,
        **({} if arcface is None else {"identity": IdentityNetwork(arcface)}),
    }
    tokenizer = ClipTokenizer()
    prompt_tokens = tokenizer(list(prompts)) if prompts else None
    stored_prompts = {prompt: prompt_file(prompt) for prompt in prompts}
    networks: dict[str, dict] = {}
    timings: dict[str, float] = {}
    cache = export_cache() if reuse_exports else None
    reused = []
    with StagedDirectory(out, force) as staged:
        for name, contract in contracts.items():
            on_stage(f"exporting {name}")
            checked = export_checked(
                modules[name], contract, staged.path / contract.filename, opset, cache=cache, on_stage=on_stage
            )
            networks[name] = {**contract.as_dict(), "parity": checked.parity}
            timings[f"export_{name}"], timings[f"parity_{name}"] = checked.export_s, checked.check_s
            if checked.reused:
                reused.append(name)

        on_stage("writing tokenizer, mean W and prompts")
        (staged.path / TOKENIZER_VOCAB).parent.mkdir()
        shutil.copyfile(packaged_vocab_path(), staged.path / TOKENIZER_VOCAB)
        np.save(staged.path / MEAN_W, mean_latent(generator).numpy())
        if prompt_tokens is not None and clip is not None:
            (staged.path / PROMPTS_DIR).mkdir()
            with torch.no_grad():
                text_latents = checkpoint.text_mapper(clip(torch.from_numpy(prompt_tokens))).numpy()
            for prompt, latents in zip(prompts, text_latents, strict=True):
                np.save(staged.path / stored_prompts[prompt], latents[None])

        files = sorted(str(path.relative_to(staged.path)) for path in staged.path.rglob("*") if path.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "source": {
                "checkpoint": str(checkpoint_path),
                "checkpoint_sha256": sha256_file(checkpoint_path),
                "clip_weights": None if clip_weights is None else str(clip_weights),
                **({} if encoder is None else {"encoder": str(encoder), "encoder_sha256": sha256_file(encoder)}),
                **(
                    {}
                    if identity_weights is None
                    else {"identity_weights": str(identity_weights), "identity_sha256": sha256_file(identity_weights)}
                ),
            },
            "weights": {
                "generator_sha256": checkpoint.generator_sha256(),
                **({} if e4e is None else {"encoder_generator_sha256": e4e.generator_sha256()}),
            },
            "opts": {
                "size": config.size,
                "n_latent": config.n_latent,
                "style_dim": config.style_dim,
                "description": checkpoint.description,
                "source_text": checkpoint.source_text,
                "w_space": bool(checkpoint.opts.get("w_space", False)),
                "mapper_groups": list(checkpoint.mapper_config.groups),
            },
            "export": {
                "exporter": "torch.onnx (dynamo)",
                "opset": opset,
                "precision": "fp32",
                "parity_batches": list(PARITY_BATCHES),
                "reused": reused,
                "seconds": {key: round(value, 3) for key, value in timings.items()},
            },
            "networks": networks,
            "tokenizer": {"vocab": TOKENIZER_VOCAB},
            "mean_w": MEAN_W,
            "prompts": stored_prompts,
            "files": {relative: sha256_file(staged.path / relative) for relative in files},
        }
        write_manifest(staged.path, manifest)
    return manifest
