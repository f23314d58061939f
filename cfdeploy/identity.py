"""The identity score: is the edit still the same person? ArcFace's cosine similarity, as CF-CLIP's identity loss
measures it (the score is ``1 - loss``).

The official loss pools each image to 256 px, keeps the face window, pools it to 112 px and runs ArcFace
IR-SE-50. The first step is here, on the host (:func:`pool_to`); the rest is the backend's identity network
(a bundle's ``identity.onnx``, or the torch backend's ArcFace from ``--identity-weights``), which takes 256 px
faces whatever the generator's size. Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfdeploy.contracts import IDENTITY_IMAGE_SIZE


def pooling_matrix(source: int, size: int) -> np.ndarray:
    """Adaptive average pooling along one axis as a ``[size, source]`` matrix: output ``i`` is the mean of inputs
    ``floor(i·source/size)`` up to ``ceil((i+1)·source/size)``, PyTorch's windows."""
    matrix = np.zeros((size, source), np.float32)
    for index in range(size):
        start, end = index * source // size, -(-(index + 1) * source // size)
        matrix[index, start:end] = 1 / (end - start)
    return matrix


def pool_to(images: np.ndarray, size: int = IDENTITY_IMAGE_SIZE) -> np.ndarray:
    """Images ``[B, C, H, W]`` average-pooled to ``[B, C, size, size]`` as ``F.adaptive_avg_pool2d`` pools them.

    A side that is a multiple of ``size`` (1024 and 512 px generators) takes the mean of each block; any other
    side (a 64 px generator is upsampled) multiplies by the windows' matrices, which is the same mean, slower.
    """
    batch, channels, height, width = images.shape
    if (height, width) == (size, size):
        return np.ascontiguousarray(images, np.float32)
    if height % size == 0 and width % size == 0:
        blocks = images.reshape(batch, channels, size, height // size, size, width // size)
        return np.ascontiguousarray(blocks.mean(axis=(3, 5), dtype=np.float32))
    rows, cols = pooling_matrix(height, size), pooling_matrix(width, size)
    return np.ascontiguousarray(rows @ images.astype(np.float32) @ cols.T)


def cosine(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of unit embeddings ``[B, D]`` (ArcFace normalises its own), in float64."""
    return np.einsum("bd,bd->b", first.astype(np.float64), second.astype(np.float64))


def identity_scores(
    backend: Any, edits: np.ndarray, sources: np.ndarray, faces: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """ArcFace cosines of each code's edit, in one call of the identity network.

    Args:
        backend: an :class:`~cfdeploy.editing.EditBackend` that has the identity network.
        edits: the generator's images of the edited codes ``[B, 3, S, S]``.
        sources: its images of the source codes (a photo's reconstruction) ``[B, 3, S, S]``.
        faces: the aligned photos the codes came from ``[B, 3, 256, 256]`` in [-1, 1], or None.

    Returns:
        With ``faces``: ``reconstruction`` (face against its reconstruction) and ``edit`` (face against its edit);
        without: ``edit`` (the source code's image against its edit). Each ``[B]``.
    """
    images = [pool_to(edits), pool_to(sources), *(() if faces is None else (faces,))]
    features = np.split(backend.identity_features(np.concatenate(images)), len(images))
    if faces is None:
        edited, source = features
        return {"edit": cosine(source, edited)}
    edited, source, face = features
    return {"reconstruction": cosine(face, source), "edit": cosine(face, edited)}
