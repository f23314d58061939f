"""``cfdeploy serve`` on Ray Serve: one deployment per bundle, dynamic batching of the generator, an HTTP router.

Each request runs the text branch (cached per prompt in the bundle) and the latent editor on its own codes, as
``cfdeploy edit`` does (:func:`~cfdeploy.editing.edit_codes`); its codes then join other requests' in
``@serve.batch`` calls of the generator, whose output does not depend on the batch it ran in (on
ONNX Runtime's CPU kernels; GPU kernels may round differently by batch size). So a served image is
the same PNG bytes ``cfdeploy edit`` writes. Ray does
the queueing, replicas and back-pressure; nothing here schedules.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from ray import serve
from ray.exceptions import RayError
from ray.serve import Deployment
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cfdeploy.editing import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PNG_COMPRESSION,
    StageTimer,
    edit_codes,
    finite_result,
    sample_codes,
    text_branch,
)
from cfdeploy.errors import CfdeployError, require_range
from cfdeploy.outputs import png_bytes, to_uint8
from cfdeploy.photos.images import Photo, photo_from_bytes, save_photo
from cfdeploy.photos.invert import FaceCrop, align_faces, encode_faces, face_edits
from cfdeploy.photos.landmarks import DlibLandmarks, NoFaceFound, select_faces
from cfdeploy.photos.paste import paste_faces
from cfdeploy.serving.cluster import (
    actor_backend_options,
    check_resources,
    connect,
    disconnect,
    local_ray_lost,
    ray_logs,
    ray_prints_to_log,
    require_resources,
)
from cfdeploy.serving.protocol import (
    MAX_BODY_BYTES,
    MAX_CODES_PER_REQUEST,
    BundleInfo,
    EditReply,
    EditRequest,
    RequestError,
    parse_edit_request,
    reply_json,
)

APP_NAME = "cfdeploy"
DRAIN_LIMIT = 4 * MAX_BODY_BYTES  # an oversize body is read and dropped up to this, then the connection is cut
ROUTER_MIN_ONGOING = (
    256  # the router only parses and forwards: it holds what the bundles queue, and refuses the rest fast
)
STOP_WAIT_S, STOP_TIMEOUT_S = 0.2, 1.0  # replicas stop at once: Server.stop drains the edits in flight first
DRAIN_POLL_S, DRAIN_CALL_S = 0.2, 5.0
_log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How ``cfdeploy serve`` runs; the CLI's options, one to one."""

    bundles: tuple[Path, ...]
    backend: str = "onnxruntime"
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_ongoing: int = 32
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    host: str = "127.0.0.1"
    port: int = 8000
    precision: str | None = None  # openvino: bf16
    session_cache: bool | None = None  # False: --no-session-cache
    landmarks_model: Path | None = None
    grace_s: float = 20.0  # on stopping, how long requests in flight may take to finish

    def check(self) -> None:
        require_range(1, replicas=self.replicas, max_batch=self.max_batch, max_ongoing=self.max_ongoing)
        if self.landmarks_model is not None:  # dlib installed, the file a 68-point predictor: known before Ray starts
            DlibLandmarks(self.landmarks_model)
        if not np.isfinite(self.batch_wait_ms) or self.batch_wait_ms < 0:
            raise CfdeployError(f"--batch-wait-ms must be a finite number, 0 or more, got {self.batch_wait_ms}")
        if not np.isfinite(self.grace_s) or self.grace_s < 0:
            raise CfdeployError(f"--grace-s must be a finite number, 0 or more, got {self.grace_s}")
        check_resources(self.backend, self.cpus_per_replica, self.gpus_per_replica, "replica")
        if not 0 < self.port < 65536:
            raise CfdeployError(f"--port must be from 1 to 65535, got {self.port}")


def require_free_port(host: str, port: int) -> None:
    """Refuse, before Ray starts, an address Ray Serve's proxy could not listen on (it binds the same way)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as error:
        why = "already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        raise CfdeployError(f"cannot listen on {host}:{port}: {why} (give another --port or --host)") from None


class BundleEditor:
    """One bundle on one backend. Backend calls go through one thread, in order: TensorRT's execution
    contexts are not thread-safe, and the event loop stays free to take requests into the next batch."""

    def __init__(
        self,
        bundle: str,
        backend: str,
        options: dict[str, Any],
        max_batch: int,
        batch_wait_s: float,
        landmarks_model: str | None = None,
    ) -> None:
        from cfdeploy.backends import open_backend

        self.backend = open_backend(backend, Path(bundle), **options)
        self.landmarks = DlibLandmarks(Path(landmarks_model)) if landmarks_model is not None else None
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend")
        batched: Any = self.render  # Ray's overloads type a batched method as a plain callable
        batched.set_max_batch_size(max_batch)
        batched.set_batch_wait_timeout_s(batch_wait_s)

    async def _call(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.runner, function, *args)

    async def edit(self, request: EditRequest) -> EditReply | RequestError:
        """Edit one request's codes; bad input the router could not see (a prompt over 77 tokens) is returned, not raised."""
        started = time.perf_counter()
        try:
            # Byte-pair merging is Python work of up to a second for a long prompt: off the one backend thread, so
            # other requests' networks run meanwhile.
            tokens, tokenize_s = await asyncio.to_thread(self._tokenize, request.prompt)
            w_hat, timings, faces = await self._call(self._edit_latents, request, tokens)
            if tokens is not None:
                timings["tokenize"] = tokenize_s
        except NoFaceFound as error:
            return RequestError(str(error), 422)
        except RequestError as error:
            return error
        except CfdeployError as error:
            return RequestError(str(error))
        rendered = [] if request.returns == "npy" else await asyncio.gather(*(self.render(code) for code in w_hat))
        try:  # checked per request: a batch shared with other requests must not fail them all
            for image, _ in rendered:
                finite_result(image, "images", "the codes")
        except CfdeployError as error:
            return RequestError(str(error))
        batches = [batch for _, batch in rendered]
        if faces is not None:
            paste_started = time.perf_counter()
            edited = list(to_uint8(np.stack([image for image, _ in rendered])))
            photo, records = await asyncio.get_running_loop().run_in_executor(None, faces.paste, edited)
            timings["paste"] = time.perf_counter() - paste_started
            timings["total"] = time.perf_counter() - started
            rounded = {name: round(seconds, 6) for name, seconds in timings.items()}
            return EditReply([], w_hat, batches, rounded, photo, records)
        pngs: list[bytes] = []
        if rendered:
            png_started = time.perf_counter()
            loop = asyncio.get_running_loop()
            pngs = list(
                await asyncio.gather(
                    *(
                        loop.run_in_executor(None, png_bytes, to_uint8(image[None])[0], DEFAULT_PNG_COMPRESSION)
                        for image, _ in rendered
                    )
                )
            )
            timings["png"] = time.perf_counter() - png_started
        timings["total"] = time.perf_counter() - started
        return EditReply(pngs, w_hat, batches, {k: round(v, 6) for k, v in timings.items()})

    def _tokenize(self, prompt: str | None) -> tuple[np.ndarray | None, float]:
        started = time.perf_counter()
        tokens = None if prompt is None else self.backend.tokenize([prompt])
        return tokens, time.perf_counter() - started

    def _edit_latents(
        self, request: EditRequest, tokens: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, float], PhotoFaces | None]:
        timer = StageTimer()
        backend = self.backend
        faces = None
        if request.latents is not None:
            w = request.latents
        elif request.image is not None:
            with timer.stage("encoder"):
                w = backend.encode(request.image)
        elif request.photo is not None:
            with timer.stage("align"):
                faces = PhotoFaces.found(request, self.landmarks)
            with timer.stage("encoder"):
                w = encode_faces(backend, faces.crops, DEFAULT_BATCH_SIZE)
        else:
            assert request.seed is not None
            w = sample_codes(backend, request.seed, request.num, request.truncation)
        text_latents = text_branch(backend, request.prompt, request.text_features, timer, tokens)  # its prompt cache
        with timer.stage("latent_editor"):
            w_hat = edit_codes(backend, w, text_latents, request.strength)
        return w_hat, dict(timer.seconds), faces

    @serve.batch  # its size and wait are set per deployment in __init__
    async def render(self, codes: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """The generator over codes from concurrent requests (W+ ``[n, 512]`` each); each image with its batch size."""
        images = await self._call(self.backend.synthesize, np.stack(codes))
        _log.info("generator batch of %d", len(codes))
        return [(image, len(codes)) for image in images]


@dataclass(frozen=True)
class PhotoFaces:
    """A request's photo (``return: photo``), decoded with ``load_photo``'s limits, and its faces aligned."""

    photo: Photo
    crops: list[FaceCrop]

    @classmethod
    def found(cls, request: EditRequest, landmarks: DlibLandmarks | None) -> PhotoFaces:
        """The request's landmarks if it sent them, else dlib's; the largest face unless ``all_faces``."""
        assert request.photo is not None
        photo = photo_from_bytes(request.photo, "image")
        if request.landmarks is not None:
            faces = request.landmarks
        else:
            assert landmarks is not None  # parse_edit_request refuses a photo without landmarks otherwise
            faces = landmarks.faces(photo.image)
        chosen = select_faces(faces, "image", request.all_faces, size=photo.image.size)
        if len(chosen) > MAX_CODES_PER_REQUEST:
            raise RequestError(f"image: {len(chosen)} faces; the limit is {MAX_CODES_PER_REQUEST}", 413)
        return cls(photo, align_faces(photo.image, chosen, Path("image")))

    def paste(self, edited: list[np.ndarray]) -> tuple[bytes, list[dict[str, Any]]]:
        """The photo with the faces' edits pasted back, encoded as it came; what was done to each face."""
        pasted = paste_faces(self.photo.image, face_edits(self.crops, edited))
        buffer = io.BytesIO()
        save_photo(buffer, self.photo, pasted.pixels)
        records = [
            {"box": crop.record["box"], "alignment": crop.record["alignment"], **face}
            for crop, face in zip(self.crops, pasted.faces, strict=True)
        ]
        return buffer.getvalue(), records


class Router:
    """The HTTP ingress: parses and checks requests, routes each to its bundle's deployment, encodes replies."""

    def __init__(self, editors: dict[str, Any], infos: dict[str, BundleInfo], aligns_photos: bool = False) -> None:
        self.editors = editors
        self.infos = infos
        self.aligns_photos = aligns_photos
        self.stopping = False
        self.in_flight = 0

    def drain(self) -> int:
        """Take no new edits (503, and /healthz 503 so that load balancers look elsewhere); the edits in flight."""
        self.stopping = True
        return self.in_flight

    def edits_in_flight(self) -> int:
        return self.in_flight

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/healthz" and method == "GET":
            if self.stopping:
                return JSONResponse({"status": "stopping", "bundles": sorted(self.infos)}, status_code=503)
            return JSONResponse({"status": "ok", "bundles": sorted(self.infos)})
        if path == "/v1/bundles" and method == "GET":
            return JSONResponse({"bundles": [info.as_json() for info in self.infos.values()]})
        if path == "/v1/edits" and method == "POST":
            if self.stopping:
                return JSONResponse({"error": "the server is stopping; retry on another"}, status_code=503)
            self.in_flight += 1
            try:
                return await self._edit(request)
            except RequestError as error:
                return JSONResponse({"error": str(error)}, status_code=error.status)
            finally:
                self.in_flight -= 1
        if path in ("/healthz", "/v1/bundles", "/v1/edits"):
            return JSONResponse({"error": f"{method} is not allowed on {path}"}, status_code=405)
        return JSONResponse(
            {"error": f"no such endpoint {path} (GET /healthz, GET /v1/bundles, POST /v1/edits)"}, status_code=404
        )

    async def _edit(self, request: Request) -> Response:
        body = bytearray()
        received = 0
        async for chunk in request.stream():  # past the limit, read on (to DRAIN_LIMIT) so the client hears the 413
            received += len(chunk)
            if len(body) <= MAX_BODY_BYTES:
                body += chunk[: MAX_BODY_BYTES + 1 - len(body)]
            if received > DRAIN_LIMIT:
                break
        png_only = "image/png" in request.headers.get("accept", "")
        parsed = await asyncio.to_thread(  # off the event loop
            parse_edit_request, bytes(body), self.infos, png_only, self.aligns_photos
        )
        try:
            reply = await self.editors[parsed.bundle].edit.remote(parsed)
        except BackPressureError:
            raise RequestError(f"bundle {parsed.bundle!r} is busy (its queue is full); retry later", 503) from None
        if isinstance(reply, RequestError):
            raise reply
        if png_only and parsed.returns != "npy":
            return Response(
                reply.pngs[0], media_type="image/png", headers={"X-Generator-Batch": str(reply.generator_batches[0])}
            )
        content = await asyncio.to_thread(lambda: json.dumps(reply_json(parsed, reply)))
        return Response(content, media_type="application/json")


# serve.deployment is annotated as returning a decorator even when given the class.
EDITOR = cast(Deployment, serve.deployment(BundleEditor))
ROUTER = cast(Deployment, serve.deployment(Router))


def bundle_infos(settings: ServeSettings) -> dict[str, BundleInfo]:
    """Each bundle opened (manifest checked) once in the driver; names are the directories' names and must differ."""
    from cfdeploy.bundle import Bundle

    infos: dict[str, BundleInfo] = {}
    for path in settings.bundles:
        bundle = Bundle(path)
        for network in bundle.manifest["networks"]:  # damage found here, in one line, not by every replica in turn
            bundle.checked_network_sha256(network)
        name = path.resolve().name
        if name in infos:
            raise CfdeployError(
                f"{path}: two bundles are named {name!r}; serve bundles from directories with different names"
            )
        infos[name] = BundleInfo(
            name,
            bundle.size,
            bundle.n_latent,
            bundle.style_dim,
            tuple(bundle.manifest.get("prompts", {})),
            bundle.description,
            settings.backend,
            bundle.has_network("clip_text"),
            bundle.has_network("encoder"),
        )
    return infos


def build_application(settings: ServeSettings, infos: dict[str, BundleInfo]) -> Any:
    """The Ray Serve application: a :class:`BundleEditor` deployment per bundle behind one :class:`Router`."""
    actor_options = {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica}
    editors = {
        name: EDITOR.options(
            name=f"edit-{name}",
            num_replicas=settings.replicas,
            ray_actor_options=actor_options,
            max_ongoing_requests=settings.max_ongoing,
            max_queued_requests=settings.max_ongoing * settings.replicas,
            graceful_shutdown_wait_loop_s=STOP_WAIT_S,
            graceful_shutdown_timeout_s=STOP_TIMEOUT_S,
        ).bind(
            str(path.resolve()),
            settings.backend,
            actor_backend_options(
                settings.backend,
                settings.cpus_per_replica,
                settings.gpus_per_replica,
                settings.precision,
                settings.session_cache,
            ),
            settings.max_batch,
            settings.batch_wait_ms / 1000,
            str(settings.landmarks_model.resolve()) if settings.landmarks_model is not None else None,
        )
        for name, path in zip(infos, settings.bundles, strict=True)
    }
    router_limit = max(
        ROUTER_MIN_ONGOING, 4 * settings.max_ongoing * settings.replicas * len(infos)
    )  # never the bottleneck
    return ROUTER.options(
        max_ongoing_requests=router_limit,
        max_queued_requests=router_limit,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_wait_loop_s=STOP_WAIT_S,
        graceful_shutdown_timeout_s=STOP_TIMEOUT_S,
    ).bind(editors, infos, settings.landmarks_model is not None)


class Server:
    """A running ``cfdeploy serve``: a local Ray started here, or the cluster at ``ray_address``, with the application.

    Everything that can be checked is checked before Ray starts (settings, the bundles' files, the port); a start
    that fails later stops what it started. Use as a context manager, or call :meth:`stop`: the edits in flight
    finish (up to ``settings.grace_s``), then on a local Ray, Serve and Ray stop with every process they started;
    on a joined cluster, only this application is removed (another application named ``cfdeploy`` there is refused).
    ``verbose``: Ray's log lines on the console, not only in :attr:`ray_logs`.
    """

    def __init__(
        self,
        settings: ServeSettings,
        ray_address: str | None = None,
        num_cpus: int | None = None,
        *,
        verbose: bool = False,
    ) -> None:
        settings.check()
        infos = bundle_infos(settings)
        if ray_address is None:
            require_free_port(settings.host, settings.port)
        self.settings = settings
        self.url = f"http://{settings.host}:{settings.port}"
        self._shared_cluster = ray_address is not None
        self._deployed = False
        self._lost: bool | None = None
        self._connected = connect(ray_address, num_cpus, verbose=verbose)
        self.ray_logs = ray_logs()
        try:
            with ray_prints_to_log():
                require_resources(
                    settings.cpus_per_replica, settings.gpus_per_replica, "replica", settings.replicas * len(infos)
                )
                if self._shared_cluster and APP_NAME in serve.status().applications:
                    raise CfdeployError(
                        f"the Ray cluster at {ray_address} already serves an application named {APP_NAME!r} "
                        "(another cfdeploy serve?); stop it first"
                    )
                try:
                    serve.start(http_options={"host": settings.host, "port": settings.port})
                except RayError as error:
                    raise CfdeployError(f"Ray Serve could not start: {_first_line(error)}") from None
                self._deployed = True
                serve.run(build_application(settings, infos), name=APP_NAME, route_prefix="/")
        except BaseException:  # Ctrl-C while starting too: nothing of this server is left running
            self.stop(grace_s=0)
            raise

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def drain(self, grace_s: float | None = None) -> int:
        """Refuse new edits, and wait up to ``grace_s`` (default: the settings') for those in flight; those left.
        A server whose router is gone (its processes stopped by the same signal, say) has nothing to drain."""
        if not self._deployed or self._ray_lost():
            return 0
        deadline = time.monotonic() + (self.settings.grace_s if grace_s is None else grace_s)
        try:
            router = serve.get_app_handle(APP_NAME)
            left: int = router.drain.remote().result(timeout_s=DRAIN_CALL_S)
            while left and time.monotonic() < deadline:
                time.sleep(DRAIN_POLL_S)
                left = router.edits_in_flight.remote().result(timeout_s=DRAIN_CALL_S)
        except (RayError, RayServeException, TimeoutError):
            return 0
        return left

    def _ray_lost(self) -> bool:
        """Whether the local Ray started here was stopped with this process (by a signal to its process group):
        then there is nothing left to drain or remove. Looked at once."""
        if self._lost is None:
            self._lost = self._connected and local_ray_lost()
        return self._lost

    def stop(self, grace_s: float | None = None) -> None:
        """Drain (:meth:`drain`), then remove this application (on a shared cluster, only it: other Serve apps keep
        running) and leave Ray; a local Ray started here stops with every process it started."""
        with ray_prints_to_log():
            try:
                if self._deployed and not self._ray_lost():
                    if grace_s != 0:
                        self.drain(grace_s)
                    self._deployed = False
                    if self._shared_cluster:
                        serve.delete(APP_NAME)
                    else:
                        serve.shutdown()
            finally:
                if self._connected:
                    self._connected = False
                    disconnect()


def _first_line(error: BaseException) -> str:
    """The message of what a Ray actor raised (its cause), first line only."""
    cause = getattr(error, "cause", None) or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
