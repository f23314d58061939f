"""Where each of U's tensors lives in an exported UNet graph, so a TensorRT engine can take another run's U.

A bundle's UNet engine is built refittable: another run on the same base model, rank and resolution
differs from the bundle's only in U's values, so it is a refit, not a rebuild. The map is made at
export, where both the graph and U are at hand: each tensor of U is found among the graph's
initializers by name (torch.onnx's dynamo exporter keeps module paths), or else by a hash of its
values as stored or transposed (exporters may anonymise Linear weights and store them transposed).
Torch-free: the TensorRT runtime reads the map from the bundle's manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.errors import CfdeployError


def initializer_name(key: str, adapter: str) -> str:
    """PEFT's state-dict key (``….lora_A.weight``) as the module path in the model (``….lora_A.U.weight``)."""
    for part in (".lora_A.", ".lora_B."):
        key = key.replace(part, f"{part}{adapter}.")
    return key


def value_digest(array: np.ndarray) -> str:
    """A hash of the values and shape, in float32 (what the exported graphs store)."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(values.shape).encode() + values.tobytes()).hexdigest()


def match_initializers(
    shapes: Mapping[str, tuple[int, ...]],
    load: Callable[[str], np.ndarray],
    adapter_state: Mapping[str, np.ndarray],
    adapter: str,
) -> dict[str, dict[str, Any]]:
    """``{peft key: {"initializer": name, "transposed": bool, "shape": [...]}}`` for every tensor of the adapter.

    ``shapes`` are the graph's initializers' shapes by name and ``load(name)`` their values (only read
    for tensors not found by name). A tensor found nowhere, or whose values occur more than once, is
    refused: a refit through an uncertain map would silently edit with the wrong weights.
    """
    mapping: dict[str, dict[str, Any]] = {}
    by_value: dict[str, list[tuple[str, bool]]] | None = None
    for key, value in adapter_state.items():
        wanted = initializer_name(key, adapter)
        named = [name for name in shapes if name == wanted or name.endswith("." + wanted)]
        if len(named) == 1 and tuple(shapes[named[0]]) == tuple(value.shape):
            mapping[key] = {"initializer": named[0], "transposed": False, "shape": list(value.shape)}
            continue
        if by_value is None:
            sizes = {int(np.prod(tensor.shape)) for tensor in adapter_state.values()}
            by_value = _digests(shapes, load, sizes)
        found = by_value.get(value_digest(value), [])
        if len(found) != 1:
            problem = "is not among" if not found else f"matches {len(found)} of"
            raise CfdeployError(f"{key} ({wanted}) {problem} the graph's initializers, by name or by value")
        name, transposed = found[0]
        mapping[key] = {"initializer": name, "transposed": transposed, "shape": list(value.shape)}
    used = [entry["initializer"] for entry in mapping.values()]
    if len(set(used)) != len(used):
        raise CfdeployError(
            "two of the adapter's tensors map to one initializer; the graph cannot be refitted reliably"
        )
    return mapping


def _digests(
    shapes: Mapping[str, tuple[int, ...]], load: Callable[[str], np.ndarray], sizes: set[int]
) -> dict[str, list[tuple[str, bool]]]:
    """Value hashes of the initializers that could hold an adapter tensor, as stored and transposed."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for name, shape in shapes.items():
        if int(np.prod(shape)) not in sizes:
            continue
        value = load(name)
        found.setdefault(value_digest(value), []).append((name, False))
        if value.ndim == 2:
            found.setdefault(value_digest(value.T), []).append((name, True))
    return found


def check_refit_map(mapping: Mapping[str, Any], manifest: Path) -> None:
    """Refuse a refit map whose entries are not ``{"initializer": str, "transposed": bool, "shape": [int, ...]}``."""
    for key, entry in mapping.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("initializer"), str)
            and isinstance(entry.get("transposed"), bool)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in entry["shape"])
        ):
            raise CfdeployError(
                f"{manifest}: unet.refit.weights[{key!r}] is {entry!r:.120}, expected "
                '{"initializer": NAME, "transposed": true|false, "shape": [sizes]}'
            )


def require_initializers(weights: Mapping[str, np.ndarray], graph: bytes, source: Path, manifest: Path) -> None:
    """Refuse weights for initializers the graph lacks, or has in another shape.

    ONNX Runtime ignores an override whose name is not in the graph, so a refit map that names
    tensors the graph does not hold would sample the bundle's own U without a word (TensorRT's refitter
    refuses it itself).
    """
    try:
        shapes = graph_initializer_shapes(graph)
    except ValueError as why:
        raise CfdeployError(f"{source}: not a readable ONNX model ({why})") from None
    for name, value in weights.items():
        if name not in shapes:
            raise CfdeployError(
                f"{manifest}: its refit map names the initializer {name!r}, which {source.name} does not hold"
            )
        if shapes[name] != tuple(value.shape):
            raise CfdeployError(
                f"{manifest}: its refit map gives {name!r} the shape {tuple(value.shape)}, "
                f"{source.name} holds {shapes[name]}"
            )


def graph_initializer_shapes(model: bytes) -> dict[str, tuple[int, ...]]:
    """The main graph's initializers, name → shape, read from a serialised ONNX ``ModelProto``.

    From the protobuf wire format itself (ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.dims = 1 and name = 8): onnx is not a run-time dependency, and weights are skipped,
    not copied. Raises ValueError on bytes that are not a well-formed message.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for number, _, graph in _fields(memoryview(model)):
        if number != 7 or not isinstance(graph, memoryview):
            continue
        for field, _, tensor in _fields(graph):
            if field != 5 or not isinstance(tensor, memoryview):
                continue
            name, dims = "", []
            for part, kind, value in _fields(tensor):
                if part == 8 and isinstance(value, memoryview):
                    name = bytes(value).decode("utf-8", "replace")
                elif part == 1 and kind == 0 and isinstance(value, int):
                    dims.append(value)
                elif part == 1 and isinstance(value, memoryview):  # packed
                    dims.extend(_packed_varints(value))
            shapes[name] = tuple(dims)
    return shapes


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise ValueError(f"a truncated number at byte {position}")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _packed_varints(buffer: memoryview) -> list[int]:
    values, position = [], 0
    while position < len(buffer):
        value, position = _varint(buffer, position)
        values.append(value)
    return values


def _fields(buffer: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """A message's fields as (number, wire type, value): an int for varints, else the field's bytes."""
    position = 0
    while position < len(buffer):
        key, position = _varint(buffer, position)
        number, kind = key >> 3, key & 7
        value: int | memoryview
        if kind == 0:
            value, position = _varint(buffer, position)
            yield number, kind, value
            continue
        if kind == 2:
            size, position = _varint(buffer, position)
        elif kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
        else:
            raise ValueError(f"wire type {kind} at byte {position}")
        if position + size > len(buffer):
            raise ValueError(f"a field runs past the end at byte {position}")
        yield number, kind, buffer[position : position + size]
        position += size


_FIXED_SIZES = {1: 8, 5: 4}  # protobuf's 64- and 32-bit wire types


def refit_weights(
    mapping: Mapping[str, Mapping[str, Any]], adapter_state: Mapping[str, np.ndarray], source: Path
) -> dict[str, np.ndarray]:
    """The engine weights for ``adapter_state`` (another run's U): by initializer name, transposed where recorded."""
    missing = sorted(set(mapping) - set(adapter_state))
    extra = sorted(set(adapter_state) - set(mapping))
    if missing or extra:
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{len(extra)} unexpected (e.g. {extra[0]})"
        )
        raise CfdeployError(f"{source}: does not fit the bundle's UNet ({len(mapping)} LoRA tensors): {detail}")
    weights = {}
    for key, entry in mapping.items():
        value = np.asarray(adapter_state[key], dtype=np.float32)
        if list(value.shape) != list(entry["shape"]):
            raise CfdeployError(
                f"{source}: {key} has shape {tuple(value.shape)}, the bundle's UNet needs {tuple(entry['shape'])}"
            )
        weights[str(entry["initializer"])] = np.ascontiguousarray(value.T if entry["transposed"] else value)
    return weights
