"""A small client for ``cfdeploy serve``, standard library and numpy only.

from cfdeploy.client import Client

client = Client("http://127.0.0.1:8000")
edit = client.edit(prompt="green lipstick", seed=1, num=4)
open("0.png", "wb").write(edit.images[0])
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cfdeploy.errors import CfdeployError
from cfdeploy.serving.protocol import decode_npy, encode_npy


class ServerError(CfdeployError):
    """The server refused a request: its HTTP status and its one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Edit:
    """A served edit: PNG bytes per image (if asked), the edited W+ codes (if asked), the generator batches they ran in;
    for ``returns="photo"``, the edited photo's bytes (in the format sent) and what was done to each face."""

    images: list[bytes]
    latents: np.ndarray | None
    generator_batches: list[int]
    timings_s: dict[str, float]
    photo: bytes | None = None
    faces: list[dict[str, Any]] = field(default_factory=list)


class Client:
    """Talks to one ``cfdeploy serve`` at ``url``; each call is one HTTP request (safe to share between threads)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> bytes:
        """One raw HTTP exchange; a refusal becomes :class:`ServerError` with the server's message."""
        sent = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(sent, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            content = error.read()
            try:
                message = str(json.loads(content)["error"])
            except (ValueError, KeyError, TypeError):
                message = content.decode("utf-8", "replace")[:200]
            raise ServerError(error.code, message) from None
        except urllib.error.URLError as error:
            raise CfdeployError(f"{self.url}: cannot reach the server ({error.reason})") from None

    def health(self) -> dict[str, Any]:
        return dict(json.loads(self.request("GET", "/healthz")))

    def bundles(self) -> list[dict[str, Any]]:
        """The served bundles: name, size, levels, precomputed prompts, backend."""
        return list(json.loads(self.request("GET", "/v1/bundles"))["bundles"])

    def edit(
        self,
        *,
        bundle: str | None = None,
        prompt: str | None = None,
        text_embedding: np.ndarray | None = None,
        latents: np.ndarray | None = None,
        seed: int | None = None,
        num: int = 1,
        truncation: float = 0.7,
        image: bytes | None = None,
        landmarks: list[Any] | np.ndarray | None = None,
        all_faces: bool | None = None,
        strength: float = 1.0,
        returns: str = "png",
    ) -> Edit:
        """``POST /v1/edits``: the same choices as ``cfdeploy edit`` (a prompt or features; codes, a seed, or
        ``image``: the bytes of an aligned face photo, for a bundle with an encoder; or, with ``returns="photo"``,
        of any photo, whose faces are found by the server's ``--landmarks-model`` or given as ``landmarks``, one
        face or a list of faces of [x, y] points, as in a ``--landmarks`` file). Conflicting choices are sent as
        given, for the server to refuse."""
        body: dict[str, Any] = {"strength": strength, "return": returns}
        named = (
            ("bundle", bundle),
            ("prompt", prompt),
            ("seed", seed),
            ("landmarks", landmarks.tolist() if isinstance(landmarks, np.ndarray) else landmarks),
            ("all_faces", all_faces),
        )
        for name, value in named:
            if value is not None:
                body[name] = value
        if seed is not None:
            body.update(num=num, truncation=truncation)
        if text_embedding is not None:
            body["text_embedding"] = encode_npy(np.asarray(text_embedding, np.float32))
        if latents is not None:
            body["latents"] = encode_npy(np.asarray(latents, np.float32))
        if image is not None:
            body["image"] = base64.b64encode(image).decode("ascii")
        reply = json.loads(
            self.request("POST", "/v1/edits", json.dumps(body).encode(), {"Content-Type": "application/json"})
        )
        return Edit(
            [base64.b64decode(image) for image in reply.get("images", [])],
            decode_npy(reply["latents"], "latents") if "latents" in reply else None,
            list(reply["generator_batches"]),
            dict(reply["timings_s"]),
            base64.b64decode(reply["photo"]) if "photo" in reply else None,
            list(reply.get("faces", [])),
        )
