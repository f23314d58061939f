"""The HTTP API of ``cfdeploy serve``, without Ray: requests parsed and checked, replies encoded.

Everything a client can get wrong is found here, before a request reaches a replica, and becomes a
:class:`RequestError` with the HTTP status and the same one-line message the CLI gives for the same
mistake. The server (:mod:`cfdeploy.serving.server`) and the client (:mod:`cfdeploy.client`) share
these definitions.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cfdeploy.bundle import without_clip_message
from cfdeploy.editing import check_sampling
from cfdeploy.errors import CfdeployError, finite_in_float32
from cfdeploy.files import npy_from_bytes, require_finite_array
from cfdeploy.inputs import broadcast_latents, check_text_embedding
from cfdeploy.photos.landmarks import Face, faces_from_json

MAX_BODY_BYTES = 16 << 20  # a request's JSON: 64 W+ codes at 1024 px are 3.1 MB of base64
MAX_CODES_PER_REQUEST = 64  # images per request; more belongs in `cfdeploy batch`
RETURNS = ("png", "npy", "both", "photo")
FIELDS = (
    "bundle",
    "prompt",
    "text_embedding",
    "latents",
    "seed",
    "num",
    "truncation",
    "image",
    "landmarks",
    "all_faces",
    "strength",
    "return",
)
LANDMARKS_MODEL_HINT = "start cfdeploy serve with --landmarks-model shape_predictor_68_face_landmarks.dat"


class RequestError(CfdeployError):
    """A request refused with an HTTP status (400 bad input, 404 unknown bundle, 413 too large, 422 no face in
    the photo, 503 busy)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BundleInfo:
    """What ``GET /v1/bundles`` lists, and what a request's codes are checked against."""

    name: str
    size: int
    n_latent: int
    style_dim: int
    prompts: tuple[str, ...]
    description: str | None
    backend: str
    has_clip: bool
    has_encoder: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "n_latent": self.n_latent,
            "style_dim": self.style_dim,
            "prompts": list(self.prompts),
            "description": self.description,
            "backend": self.backend,
            "has_clip": self.has_clip,
            "has_encoder": self.has_encoder,
        }


@dataclass(frozen=True)
class EditRequest:
    """One checked ``POST /v1/edits``: ``latents``, ``seed``/``num``/``truncation``, an aligned face ``image``
    (as the encoder's input ``[1, 3, 256, 256]``) or, with ``return: photo``, a ``photo`` (its encoded bytes,
    decoded in the replica) with its faces' ``landmarks`` if the client sent them; a prompt or text features."""

    bundle: str
    prompt: str | None
    text_features: np.ndarray | None
    latents: np.ndarray | None
    seed: int | None
    num: int
    truncation: float
    image: np.ndarray | None
    strength: float
    returns: str
    photo: bytes | None = None
    landmarks: list[Face] | None = None
    all_faces: bool = False


@dataclass
class EditReply:
    """A replica's answer: PNG bytes per image (unless ``npy`` only), the edited codes, and how it went; for
    ``return: photo``, the edited photo's bytes and what was done to each face instead of PNGs."""

    pngs: list[bytes]
    latents: np.ndarray
    generator_batches: list[int]  # the generator batch each image was rendered in (dynamic batching at work)
    timings_s: dict[str, float] = field(default_factory=dict)
    photo: bytes | None = None
    faces: list[dict[str, Any]] = field(default_factory=list)


def encode_npy(array: np.ndarray) -> str:
    from cfdeploy.outputs import npy_bytes

    return base64.b64encode(npy_bytes(array)).decode("ascii")


def _base64_field(text: object, name: str, holding: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"{name}: expected a base64 string of {holding}, found {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: not valid base64") from None


def decode_npy(text: object, name: str) -> np.ndarray:
    """A base64 ``.npy`` field (never pickled objects), or one line naming the field."""
    content = _base64_field(text, name, "a .npy file")
    try:
        return npy_from_bytes(content, name, name.replace("_", " "))
    except CfdeployError as error:
        raise RequestError(str(error)) from None


def encoder_image(text: object) -> np.ndarray:
    """A base64 JPEG/PNG/WebP of an aligned face (as ``cfdeploy invert --save-aligned`` writes) as the encoder's input."""
    from cfdeploy.photos.images import photo_from_bytes
    from cfdeploy.photos.preprocess import batch_inputs

    content = _base64_field(text, "image", "a JPEG, PNG or WebP file")
    try:
        return batch_inputs([photo_from_bytes(content, "image").image])
    except CfdeployError as error:
        raise RequestError(str(error)) from None


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name}: expected a number, found {json.dumps(value)[:40]}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not finite_in_float32(number):
        raise RequestError(f"{name} must be a finite number within float32's range, got {str(value)[:40]}")
    return number


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(f"{name}: expected an integer, found {json.dumps(value)[:40]}")
    return value


def photo_request(parsed: dict[str, Any], aligns_photos: bool) -> tuple[bytes, list[Face] | None, bool]:
    """``return: photo``: the photo's bytes, the faces' landmarks if sent, and whether every face is edited."""
    photo = _base64_field(parsed["image"], "image", "a JPEG, PNG or WebP file")
    landmarks = None
    if parsed.get("landmarks") is not None:
        try:
            landmarks = faces_from_json(parsed["landmarks"], "landmarks")
        except CfdeployError as error:
            raise RequestError(str(error)) from None
    elif not aligns_photos:
        raise RequestError(
            f"image: this server finds no faces in photos; {LANDMARKS_MODEL_HINT}, or send the faces' landmarks"
        )
    all_faces = parsed.get("all_faces", False)
    if not isinstance(all_faces, bool):
        raise RequestError(f"all_faces: expected true or false, found {json.dumps(all_faces)[:40]}")
    return photo, landmarks, all_faces


def parse_edit_request(
    body: bytes, bundles: dict[str, BundleInfo], png_only: bool = False, aligns_photos: bool = False
) -> EditRequest:
    """Check a ``POST /v1/edits`` body against the served bundles; every refusal is a :class:`RequestError`.

    ``png_only``: the client asked for ``Accept: image/png``, which answers one image. ``aligns_photos``: the
    replicas find faces themselves (``--landmarks-model``), so a photo may come without landmarks.
    """
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body is over the limit of {MAX_BODY_BYTES:,} bytes", 413)
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, a 5,000-digit number, deep nesting
        raise RequestError(f"request body is not valid JSON: {str(error)[:120]}") from None
    if not isinstance(parsed, dict):
        raise RequestError(f"request body: expected a JSON object, found {type(parsed).__name__}")
    unknown = sorted(set(parsed) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")

    name = parsed.get("bundle")
    if name is None and len(bundles) == 1:
        name = next(iter(bundles))
    if not isinstance(name, str):
        raise RequestError(f"bundle: give one of {', '.join(sorted(bundles))}")
    info = bundles.get(name)
    if info is None:
        raise RequestError(f"unknown bundle {name!r} (served: {', '.join(sorted(bundles))})", 404)

    prompt, embedding = parsed.get("prompt"), parsed.get("text_embedding")
    if (prompt is None) == (embedding is None):
        raise RequestError("give exactly one of prompt or text_embedding")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"prompt: expected a string, found {type(prompt).__name__}")
    if prompt is not None and not info.has_clip and prompt not in info.prompts:
        raise RequestError(without_clip_message(f"bundle {name!r}", info.prompts))

    latents_field, seed, image_field = parsed.get("latents"), _integer(parsed, "seed", None), parsed.get("image")
    if sum(given is not None for given in (latents_field, seed, image_field)) != 1:
        raise RequestError("give exactly one of latents, seed or image")
    returns = parsed.get("return", "png")
    if returns not in RETURNS:
        raise RequestError(f"return: expected one of {', '.join(RETURNS)}, found {json.dumps(returns)[:40]}")
    if returns == "photo" and image_field is None:
        raise RequestError("return: photo needs image, the photo to edit")
    if returns != "photo" and ("landmarks" in parsed or "all_faces" in parsed):
        raise RequestError("landmarks and all_faces are for a photo to edit and paste back (return: photo)")
    if returns == "photo" and png_only:
        raise RequestError("Accept: image/png returns one face; an edited photo comes back in JSON", 406)
    num = _integer(parsed, "num", 1)
    assert num is not None
    truncation = _number(parsed, "truncation", 0.7)
    latents = image = photo = landmarks = None
    all_faces = False
    count = 1
    if latents_field is not None:
        array = decode_npy(latents_field, "latents")
        try:
            require_finite_array(array, "latents", "latents")
            latents = broadcast_latents(array, info.n_latent, info.style_dim, "latents")
        except CfdeployError as error:
            raise RequestError(str(error)) from None
        count = len(latents)
    elif image_field is not None:
        if not info.has_encoder:
            raise RequestError(f"bundle {name!r} has no e4e encoder graph (export it with cfdeploy export --encoder)")
        if returns == "photo":
            photo, landmarks, all_faces = photo_request(parsed, aligns_photos)
        else:
            image = encoder_image(image_field)
    else:
        assert seed is not None
        try:
            check_sampling(seed, num, truncation)
        except CfdeployError as error:
            raise RequestError(str(error).replace("--", "")) from None
        count = num
    if png_only and count != 1:
        raise RequestError(f"Accept: image/png returns one image; this request makes {count}", 406)
    if count > MAX_CODES_PER_REQUEST:
        raise RequestError(
            f"{count} images in one request; the limit is {MAX_CODES_PER_REQUEST} (use cfdeploy batch for datasets)",
            413,
        )

    features = None
    if embedding is not None:
        try:
            features = check_text_embedding(
                decode_npy(embedding, "text_embedding"), count, info.style_dim, "text_embedding"
            )
        except CfdeployError as error:
            raise RequestError(str(error)) from None

    strength = _number(parsed, "strength", 1.0)
    return EditRequest(
        name, prompt, features, latents, seed, num, truncation, image, strength, returns, photo, landmarks, all_faces
    )


def reply_json(request: EditRequest, reply: EditReply) -> dict[str, Any]:
    """The JSON answer: base64 PNGs and/or the edited codes as a base64 ``.npy``, with what the server did."""
    content: dict[str, Any] = {
        "bundle": request.bundle,
        "count": len(reply.latents),
        "generator_batches": reply.generator_batches,
        "timings_s": reply.timings_s,
    }
    if request.returns in ("png", "both"):
        content["images"] = [base64.b64encode(png).decode("ascii") for png in reply.pngs]
    if request.returns in ("npy", "both"):
        content["latents"] = encode_npy(reply.latents)
    if request.returns == "photo" and reply.photo is not None:
        content["photo"] = base64.b64encode(reply.photo).decode("ascii")
        content["faces"] = reply.faces
    return content
