"""``cfdeploy refit``: give a bundle another prompt's mappers without re-exporting or rebuilding the generator.

CF-CLIP trains one checkpoint per prompt, each carrying the same generator. Refit checks that the new
checkpoint's generator weights hash to the bundle's, that its mappers have the same architecture
(every weight matched by name and shape: export keeps each mapper weight as an initializer named by its
module path, whatever its values), then writes the new weights into the bundle's text-mapper and
latent-editor graphs (nothing is traced again) and checks them against torch, recomputes the stored
prompts' text branch, and refits refittable TensorRT mapper engines where
TensorRT and a GPU are present. The new bundle is assembled beside the old one (unchanged files are
hard links) and swapped in, under the bundle's lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper
from torch import nn

from cfdeploy.backends import open_backend
from cfdeploy.bundle import (
    MANIFEST,
    ORT_ENGINE_CACHE,
    Bundle,
    write_manifest,
)
from cfdeploy.bundle_files import ENGINE_DIR
from cfdeploy.checkpoints import load_cfclip
from cfdeploy.environment import versions
from cfdeploy.errors import CfdeployError
from cfdeploy.exporter import check_parity
from cfdeploy.files import sha256_file
from cfdeploy.models.layers import with_scaled_linears
from cfdeploy.models.mappers import LatentEditor
from cfdeploy.outputs import DirectoryLock, npy_bytes, replace_directory, write_atomic
from cfdeploy.trt.plan import engine_paths

REFIT_NETWORKS = ("text_mapper", "latent_editor")


@dataclass(frozen=True)
class WeightInfo:
    shape: tuple[int, ...]
    sha256: str


def initializer_weights(model: onnx.ModelProto) -> dict[str, WeightInfo]:
    """Every initializer of ``model`` by name: shape and hash of its values."""
    weights = {}
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        weights[tensor.name] = WeightInfo(tuple(values.shape), hashlib.sha256(values.tobytes()).hexdigest())
    return weights


def match_weights(
    network: str, old: dict[str, WeightInfo], new: dict[str, WeightInfo], weights: Sequence[str] = ()
) -> list[str]:
    """Names of the initializers that change; refuses, in one line, when the new graph's do not fit the bundle's.

    ``old`` is every initializer of the bundle's graph (:func:`initializer_weights`), ``new`` the same with the
    checkpoint's weights in place; ``weights`` names the checkpoint's refittable weights (what
    :func:`cfdeploy.exporter.export_graph` keeps), to say what the bundle's graph lacks when it was exported before
    every weight kept a name of its own.
    """
    problems = [
        f"cannot place the checkpoint's weight {name} {list(new[name].shape)}: the bundle's graph has no initializer of that name"
        for name in new
        if name not in old
    ]
    problems += [
        f"cannot place the checkpoint's weight {name} {list(new[name].shape)}: the bundle's is {list(old[name].shape)}"
        for name in new
        if name in old and old[name].shape != new[name].shape
    ]
    problems += [
        f"the bundle's weight {name} {list(old[name].shape)} has no counterpart in the checkpoint's graph"
        for name in old
        if name not in new
    ]
    if not problems:
        return sorted(name for name in old if old[name].sha256 != new[name].sha256)
    if weights and not any(name in old for name in weights):
        raise CfdeployError(
            f"{network}: cannot place the checkpoint's weight {weights[0]}: the bundle's graph names its weights after "
            f"the exporter's folded constants (such as {min(old, default='mul_15')}), as cfdeploy did before each "
            "weight kept its own "
            "name, so another checkpoint's weights cannot be placed in it; export the bundle again, then refit it"
        )
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise CfdeployError(f"{network}: {problems[0]}{more}")


def refitted_graph(network: str, graph: bytes, module: nn.Module) -> tuple[bytes, list[str]]:
    """``graph`` with ``module``'s weights written over the initializers of their names, as export names and
    scales them (:func:`cfdeploy.models.layers.with_scaled_linears`), and the names of those whose values changed.

    The graph's other initializers are constants of the architecture, the same for every checkpoint of it. A weight
    the graph does not hold is one no node reads (a mapper group with no levels at this size), which export leaves
    out; the parity check that follows refuses a graph that lacks one it needs."""
    parameters = {
        name: parameter.detach().cpu().numpy() for name, parameter in with_scaled_linears(module).named_parameters()
    }
    model = onnx.load_from_string(graph)
    old = initializer_weights(model)
    # none held: a graph from before each weight kept its own name, which match_weights names as such
    placed = {name: values for name, values in parameters.items() if name in old} or parameters
    new = {
        **old,
        **{
            name: WeightInfo(tuple(values.shape), hashlib.sha256(values.tobytes()).hexdigest())
            for name, values in placed.items()
        },
    }
    changed = match_weights(network, old, new, tuple(parameters))
    for tensor in model.graph.initializer:
        if tensor.name in placed:
            if tensor.data_type != onnx.helper.np_dtype_to_tensor_dtype(placed[tensor.name].dtype):
                raise CfdeployError(
                    f"{network}: the bundle's weight {tensor.name} is not {placed[tensor.name].dtype} as the "
                    "checkpoint's is; export the bundle again, then refit it"
                )
            tensor.CopyFrom(numpy_helper.from_array(placed[tensor.name], tensor.name))
    return model.SerializeToString(), changed


def _link_tree(source: Path, target: Path) -> None:
    """Mirror ``source`` into ``target`` with hard links (copies where links are not possible)."""
    for path in source.rglob("*"):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _recompute_prompts(staged: Path, manifest: dict, session_cache: bool | None) -> None:
    """Stored prompts' ``t_w`` through the staged bundle itself: its CLIP graph and the new text mapper."""
    prompts = manifest.get("prompts", {})
    if not prompts:
        return
    write_manifest(staged, manifest)
    backend = open_backend("onnxruntime", staged, providers=["CPUExecutionProvider"], session_cache=session_cache)
    text_latents = backend.text_latents(backend.text_features(backend.tokenize(list(prompts))))
    for relative, latents in zip(prompts.values(), text_latents, strict=True):
        content = npy_bytes(latents[None])
        write_atomic(staged / relative, content)  # a new file: the live bundle's hard link is untouched
        manifest["files"][relative] = hashlib.sha256(content).hexdigest()


def _refit_engines(staged: Path, report: Callable[[str], None]) -> list[str]:
    """Refit the mapper engines that exist; returns the networks whose engines could not be (now stale)."""
    engine_dir = staged / ENGINE_DIR
    shutil.rmtree(
        engine_dir / ORT_ENGINE_CACHE, ignore_errors=True
    )  # ONNX Runtime keys these by graph name, not weights
    present = [name for name in REFIT_NETWORKS if engine_paths(engine_dir, name)[0].is_file()]
    if not present:
        return []
    try:
        from cfdeploy.trt import tensorrt_builder

        refit_engine = tensorrt_builder().refit_engine
    except CfdeployError as why:
        report(
            f"TensorRT engines for {', '.join(present)} not refitted here ({why}); they will be refused until rebuilt"
        )
        return present
    stale = []
    for name in present:
        try:
            refit_engine(
                engine_dir, name, staged / f"{name}.onnx"
            )  # writes new files: the live bundle's links are untouched
            report(f"refitted the {name} TensorRT engine")
        except CfdeployError as why:
            report(f"TensorRT engine for {name} not refitted ({why}); it will be refused until rebuilt")
            stale.append(name)
    return stale


def refit_bundle(
    bundle_path: Path,
    checkpoint_path: Path,
    report: Callable[[str], None] = lambda message: None,
    session_cache: bool | None = None,
) -> dict:
    """Swap the bundle's mappers for ``checkpoint_path``'s; returns a summary of what changed. The stored prompts are
    recomputed on ONNX Runtime, through the per-user compiled-graph cache unless ``session_cache`` is False."""
    bundle_path = bundle_path.resolve()
    Bundle(bundle_path)  # a clear error for a wrong path before any lock file is made
    with DirectoryLock(bundle_path):
        bundle = Bundle(bundle_path)
        manifest = json.loads(json.dumps(bundle.manifest))
        bundle_generator = manifest.get("weights", {}).get("generator_sha256")
        if not bundle_generator:
            raise CfdeployError(
                f"{bundle_path / MANIFEST}: records no generator hash (exported by an older cfdeploy); re-export it"
            )
        if manifest.get("prompts") and not bundle.has_network("clip_text"):
            raise CfdeployError(
                f"{bundle_path}: its precomputed prompts would need recomputing, but it has no CLIP text graph "
                "(exported --without-clip); export the new checkpoint instead"
            )
        report("loading checkpoint")
        checkpoint = load_cfclip(checkpoint_path)
        generator_sha256 = checkpoint.generator_sha256()
        if generator_sha256 != bundle_generator:
            raise CfdeployError(
                f"{checkpoint_path}: its generator weights (sha256 {generator_sha256[:12]}…) are not the bundle's "
                f"({bundle_generator[:12]}…); refit only swaps mappers trained on the same generator"
            )
        groups = list(checkpoint.mapper_config.groups)
        if groups != manifest["opts"].get("mapper_groups"):
            raise CfdeployError(
                f"{checkpoint_path}: mapper groups {groups} differ from the bundle's {manifest['opts'].get('mapper_groups')}"
            )
        contracts = bundle.contracts
        modules = {"text_mapper": checkpoint.text_mapper, "latent_editor": LatentEditor(checkpoint.mapper)}
        # named like every staging directory, so the lock clears it if this run is killed
        staged = bundle_path.parent / f".{bundle_path.name}.{os.getpid()}.partial"
        staged.mkdir()
        try:
            _link_tree(bundle_path, staged)
            changed = {}
            for name in REFIT_NETWORKS:
                contract = contracts[name]
                path = staged / contract.filename
                report(f"writing the new weights into {name}")
                graph, changed[name] = refitted_graph(name, bundle.network(name).content, modules[name])
                write_atomic(path, graph)  # a new file: the live bundle's hard link is untouched
                report(f"checking {name} against torch")
                manifest["networks"][name]["parity"] = check_parity(modules[name], contract, path)
                manifest["files"][contract.filename] = hashlib.sha256(graph).hexdigest()
            report("recomputing stored prompts")
            _recompute_prompts(staged, manifest, session_cache)
            stale = _refit_engines(staged, report)
            manifest.setdefault("source", {}).update(
                checkpoint=str(checkpoint_path), checkpoint_sha256=sha256_file(checkpoint_path)
            )
            manifest["opts"]["description"] = checkpoint.description
            manifest["opts"]["source_text"] = checkpoint.source_text
            manifest["opts"]["w_space"] = bool(checkpoint.opts.get("w_space", False))
            manifest.setdefault("refits", []).append(
                {
                    "checkpoint": str(checkpoint_path),
                    "changed_weights": changed,
                    "versions": versions(),
                    "stale_engines": stale,
                }
            )
            write_manifest(staged, manifest)
            replace_directory(staged, bundle_path)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return {
        "description": checkpoint.description,
        "changed_weights": {k: len(v) for k, v in changed.items()},
        "stale_engines": stale,
    }
