"""``cfdeploy serve`` on a local Ray with 2 CPUs, loopback only, against ``cfdeploy edit``."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfdeploy.client import Client, ServerError
from cfdeploy.outputs import npy_bytes
from cfdeploy.serving.protocol import MAX_BODY_BYTES
from conftest import assert_refused, free_port, own_ray, ray_is_connected
from drawn_faces import cartoon_faces

PROMPT = "green lipstick"  # precomputed in bundle_64
BUNDLE = "green_lipstick_64"


def test_serve_refuses_bad_settings_in_one_line_before_starting_ray(cli, bundle_64: Path, tmp_path: Path) -> None:
    with own_ray() as our_ray:
        assert_refused(
            cli("serve", "--bundle", bundle_64, "--replicas", 0), None, "--replicas must be 1 or more, got 0"
        )
        assert_refused(
            cli("serve", "--bundle", bundle_64, "--backend", "tensorrt"), None, "--backend tensorrt needs a GPU"
        )
        assert_refused(cli("serve", "--bundle", tmp_path / "absent"), None, "absent")
        assert_refused(
            cli("serve", "--bundle", bundle_64, "--bundle", bundle_64),
            None,
            "two bundles are named 'green_lipstick_64'",
        )
        assert not ray_is_connected() and not our_ray.processes()


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve_codes") / "codes.npy"
    np.save(path, np.random.default_rng(21).standard_normal((8, 10, 512)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, bundle_64: Path, bundle_with_encoder, predictor_files):
    """A replica each of the 64 px bundle with CLIP (a hard-linked copy: served prompts are cached in it) and of the
    64 px bundle with an e4e encoder, half a CPU each, behind one router; the replicas find faces in photos with
    dlib (its real detector, and a 68-point predictor trained on drawn faces)."""
    from cfdeploy.serving.server import Server, ServeSettings

    assert not ray_is_connected()
    bundle = tmp_path_factory.mktemp("served") / BUNDLE
    shutil.copytree(bundle_64, bundle, copy_function=os.link)
    _, with_encoder, _ = bundle_with_encoder
    settings = ServeSettings(
        (bundle, with_encoder),
        replicas=1,
        max_batch=8,
        batch_wait_ms=50,  # the clients' requests meet in a batch even on a loaded machine, whose threads start late
        max_ongoing=16,  # the 12 clients below, all in flight at once in the one replica's queue
        cpus_per_replica=0.5,
        port=free_port(),
        landmarks_model=predictor_files[68],
    )
    with own_ray() as our_ray:
        with Server(settings, num_cpus=2) as server:
            yield Client(server.url), bundle
        our_ray.assert_none_left()


def test_served_edits_equal_cfdeploy_edit_and_are_batched(served, codes: Path, cli, tmp_path: Path) -> None:
    client, bundle = served
    reference = tmp_path / "reference"
    assert (
        cli(
            "edit",
            "--bundle",
            bundle,
            "--backend",
            "onnxruntime",
            "--latents",
            codes,
            "--text",
            PROMPT,
            "--save-latents",
            "--out",
            reference,
        ).exit_code
        == 0
    )
    seeded = tmp_path / "seeded"
    assert (
        cli(
            "edit",
            "--bundle",
            bundle,
            "--backend",
            "onnxruntime",
            "--seed",
            3,
            "--num",
            2,
            "--text",
            PROMPT,
            "--save-latents",
            "--out",
            seeded,
        ).exit_code
        == 0
    )
    w = np.load(codes)
    expected_w_hat = np.load(reference / "latents.npy")

    def one(index: int):
        return client.edit(bundle=BUNDLE, prompt=PROMPT, latents=w[index % 8][None], returns="both")

    with ThreadPoolExecutor(12) as clients:  # more clients than a batch holds: the server batches what waits
        edits = list(clients.map(one, range(24)))
    for index, edit in enumerate(edits):
        assert edit.images[0] == (reference / f"{index % 8:06d}.png").read_bytes(), index
        assert np.abs(edit.latents[0] - expected_w_hat[index % 8]).max() <= 1e-6
    assert max(batch for edit in edits for batch in edit.generator_batches) > 1

    by_seed = client.edit(bundle=BUNDLE, prompt=PROMPT, seed=3, num=2, returns="both")
    assert by_seed.images == [(seeded / f"{index:06d}.png").read_bytes() for index in range(2)]
    np.testing.assert_allclose(by_seed.latents, np.load(seeded / "latents.npy"), atol=1e-6, rtol=0)

    body = json.dumps(
        {"bundle": BUNDLE, "latents": base64.b64encode(npy_bytes(w[:1])).decode(), "prompt": PROMPT}
    ).encode()
    png = client.request("POST", "/v1/edits", body, {"Accept": "image/png"})
    assert png == (reference / "000000.png").read_bytes()
    listed = {entry["name"]: entry for entry in client.bundles()}
    assert (listed[BUNDLE]["size"], listed[BUNDLE]["n_latent"], listed[BUNDLE]["prompts"]) == (64, 10, [PROMPT])
    assert (listed["with_encoder_64"]["has_encoder"], listed["with_encoder_64"]["has_clip"]) == (True, False)


def test_a_served_photo_edit_equals_cfdeploy_edit_images(served, bundle_with_encoder, cli, tmp_path: Path) -> None:
    client, _ = served
    _, with_encoder, _ = bundle_with_encoder
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(face)
    embedding = tmp_path / "embedding.npy"
    np.save(embedding, np.random.default_rng(4).standard_normal(512).astype(np.float32))
    reference = tmp_path / "reference"
    assert (
        cli(
            "edit",
            "--bundle",
            with_encoder,
            "--backend",
            "onnxruntime",
            "--images",
            face,
            "--aligned",
            "--text-embedding",
            embedding,
            "--save-latents",
            "--out",
            reference,
        ).exit_code
        == 0
    )
    edit = client.edit(
        bundle="with_encoder_64", image=face.read_bytes(), text_embedding=np.load(embedding), returns="both"
    )
    assert edit.images == [(reference / "000000.png").read_bytes()]
    np.testing.assert_allclose(edit.latents, np.load(reference / "latents.npy"), atol=1e-6, rtol=0)
    with pytest.raises(ServerError) as refusal:
        client.edit(bundle=BUNDLE, image=face.read_bytes(), prompt=PROMPT)
    assert (refusal.value.status, refusal.value.message) == (
        400,
        f"bundle '{BUNDLE}' has no e4e encoder graph (export it with cfdeploy export --encoder)",
    )
    with pytest.raises(ServerError) as refusal:
        client.edit(bundle="with_encoder_64", prompt="blue dog", seed=1)
    assert (refusal.value.status, refusal.value.message) == (
        400,
        "bundle 'with_encoder_64': exported --without-clip, so it "
        "edits only the prompts precomputed at export (none) or --text-embedding features",
    )
    with pytest.raises(ServerError) as refusal:
        client.edit(bundle="with_encoder_64", image=b"GIF89a not a photo", text_embedding=np.load(embedding))
    assert (refusal.value.status, refusal.value.message) == (
        400,
        "image: not a JPEG, PNG or WebP image, or its header is damaged",
    )


def test_a_photo_comes_back_whole_with_its_face_pasted_and_no_face_is_422(served, embedding_file, tmp_path) -> None:
    """An unaligned photo sent with its face's landmarks: the edited photo, the source's size and format, every pixel
    outside the pasted face's window the source's own. Sent alone, the photo is searched by dlib, which finds no
    face in it."""
    client, _ = served
    rng = np.random.default_rng(8)
    source = np.asarray(Image.fromarray(rng.integers(0, 256, (13, 17, 3), np.uint8)).resize((340, 260), Image.BICUBIC))
    sent = io.BytesIO()
    Image.fromarray(source).save(sent, format="PNG")
    five_points = [[140.0, 110.0], [200.0, 112.0], [170.0, 140.0], [148.0, 170.0], [194.0, 172.0]]
    features = np.load(embedding_file)
    edit = client.edit(
        bundle="with_encoder_64", image=sent.getvalue(), landmarks=five_points, text_embedding=features, returns="photo"
    )
    photo = Image.open(io.BytesIO(edit.photo))
    assert (photo.format, photo.size) == ("PNG", (340, 260)) and edit.images == [] and len(edit.faces) == 1
    left, top, right, bottom = edit.faces[0]["window"]
    outside = np.ones((260, 340), bool)
    outside[top:bottom, left:right] = False
    pixels = np.asarray(photo)
    np.testing.assert_array_equal(pixels[outside], source[outside])
    assert (pixels[150, 170] != source[150, 170]).any()  # the nose: edited
    assert {"align", "encoder", "latent_editor", "paste"} <= set(edit.timings_s)

    def refused(**request) -> tuple[int, str]:
        with pytest.raises(ServerError) as refusal:
            client.edit(bundle="with_encoder_64", image=sent.getvalue(), text_embedding=features, **request)
        return refusal.value.status, refusal.value.message

    assert refused(landmarks=[], returns="photo") == (422, "image: no face found")
    assert refused(returns="photo") == (422, "image: no face found")
    assert refused(landmarks=five_points) == (
        400,
        "landmarks and all_faces are for a photo to edit and paste back (return: photo)",
    )


def test_a_photo_alone_comes_back_edited_where_dlib_finds_its_face_as_cfdeploy_edit_pastes_it(
    served, bundle_with_encoder, predictor_files, embedding_file, cli, tmp_path
) -> None:
    client, _ = served
    _, with_encoder, _ = bundle_with_encoder
    photo = tmp_path / "portrait.png"
    cartoon_faces((320, 240), [(70, 20, 190)]).save(photo)
    reference = tmp_path / "reference"
    result = cli(
        "edit", "--bundle", with_encoder, "--backend", "onnxruntime", "--images", photo,
        "--landmarks-model", predictor_files[68], "--text-embedding", embedding_file, "--out", reference,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    edit = client.edit(
        bundle="with_encoder_64", image=photo.read_bytes(), text_embedding=np.load(embedding_file), returns="photo"
    )
    served_photo, expected = Image.open(io.BytesIO(edit.photo)), Image.open(reference / "portrait.png")
    assert (served_photo.format, served_photo.size, len(edit.faces)) == ("PNG", (320, 240), 1)
    np.testing.assert_array_equal(np.asarray(served_photo), np.asarray(expected))
    source, pixels = np.asarray(Image.open(photo)), np.asarray(served_photo)
    left, top, right, bottom = edit.faces[0]["window"]
    assert left > 0 and top >= 0 and right < 320 and bottom <= 240  # the drawn face's surroundings, untouched:
    outside = np.ones((240, 320), bool)
    outside[top:bottom, left:right] = False
    np.testing.assert_array_equal(pixels[outside], source[outside])
    assert (pixels[~outside] != source[~outside]).any()


def test_without_a_landmark_model_a_photo_without_landmarks_is_refused_saying_how_to_enable_it(
    bundle_with_encoder,
) -> None:
    from cfdeploy.serving.protocol import RequestError, parse_edit_request
    from cfdeploy.serving.server import ServeSettings, bundle_infos

    _, with_encoder, _ = bundle_with_encoder
    sent = io.BytesIO()
    Image.new("RGB", (40, 30)).save(sent, format="PNG")
    features = base64.b64encode(npy_bytes(np.ones(512, np.float32))).decode()
    image = base64.b64encode(sent.getvalue()).decode()
    body = json.dumps({"bundle": with_encoder.name, "image": image, "text_embedding": features, "return": "photo"})
    with pytest.raises(RequestError) as refusal:
        parse_edit_request(body.encode(), bundle_infos(ServeSettings((with_encoder,))), aligns_photos=False)
    assert (refusal.value.status, str(refusal.value)) == (
        400,
        "image: this server finds no faces in photos; start cfdeploy serve with --landmarks-model "
        "shape_predictor_68_face_landmarks.dat, or send the faces' landmarks",
    )


def test_bad_requests_get_their_status_and_one_line(served) -> None:
    client, _ = served
    good = base64.b64encode(npy_bytes(np.zeros((1, 10, 512), np.float32))).decode()

    def refused(body: bytes | dict, path: str = "/v1/edits", method: str = "POST") -> tuple[int, str]:
        sent = json.dumps({"bundle": BUNDLE, **body}).encode() if isinstance(body, dict) else body
        with pytest.raises(ServerError) as refusal:
            client.request(method, path, sent, {"Content-Type": "application/json"})
        assert "\n" not in refusal.value.message
        return refusal.value.status, refusal.value.message

    levels = base64.b64encode(npy_bytes(np.zeros((1, 14, 512), np.float32))).decode()
    nan = np.zeros((1, 10, 512), np.float32)
    nan[0, 3, 7] = np.nan
    assert refused(b"{not json")[1].startswith("request body is not valid JSON")
    assert refused({"prompt": PROMPT, "latents": "@@@"}) == (400, "latents: not valid base64")
    assert refused({"prompt": PROMPT, "latents": levels}) == (
        400,
        "latents: latents have 14 levels, the generator needs 10 (shape [1, 14, 512])",
    )
    assert refused({"prompt": PROMPT, "latents": base64.b64encode(npy_bytes(nan)).decode()}) == (
        400,
        "latents: latents contain 1 NaN/inf values",
    )
    assert refused({"prompt": PROMPT, "latents": base64.b64encode(b"not an npy").decode()})[1].startswith(
        "latents: not a readable .npy latents"
    )
    assert refused({"bundle": "blue_dog", "prompt": PROMPT, "latents": good}) == (
        404,
        "unknown bundle 'blue_dog' (served: green_lipstick_64, with_encoder_64)",
    )
    assert refused({"prompt": PROMPT, "seed": 1, "latents": good}) == (
        400,
        "give exactly one of latents, seed or image",
    )
    assert refused({"latents": good}) == (400, "give exactly one of prompt or text_embedding")
    assert refused({"prompt": PROMPT, "seed": 1, "num": 0}) == (400, "num must be between 1 and 100,000, got 0")
    assert refused({"prompt": PROMPT, "seed": 1, "strength": "strong"}) == (
        400,
        'strength: expected a number, found "strong"',
    )
    assert refused({"prompt": PROMPT, "seed": 1, "num": 65}) == (
        413,
        "65 images in one request; the limit is 64 (use cfdeploy batch for datasets)",
    )
    assert refused(b" " * (MAX_BODY_BYTES + 1)) == (413, f"request body is over the limit of {MAX_BODY_BYTES:,} bytes")
    status, message = refused(
        {"prompt": "lipstick " * 80, "latents": good}
    )  # over CLIP's 77 tokens: found in a replica
    assert status == 400 and "77" in message
    assert refused({"prompt": PROMPT, "seed": -1}) == (400, "seed must be from 0 to 2^63-1, got -1")
    assert refused({"prompt": PROMPT, "seed": 1, "strength": 10**400}) == (
        400,
        f"strength must be a finite number within float32's range, got {str(10**400)[:40]}",
    )
    assert refused(b"[" * 100_000)[1].startswith("request body is not valid JSON")
    assert refused(b'{"seed": 1' + b"0" * 5000 + b"}")[1].startswith("request body is not valid JSON")
    with pytest.raises(ServerError) as refusal:
        client.request(
            "POST",
            "/v1/edits",
            json.dumps({"bundle": BUNDLE, "prompt": PROMPT, "seed": 1, "num": 2}).encode(),
            {"Accept": "image/png"},
        )
    assert (refusal.value.status, refusal.value.message) == (
        406,
        "Accept: image/png returns one image; this request makes 2",
    )
    only_codes = client.edit(bundle=BUNDLE, prompt=PROMPT, seed=1, returns="npy")
    assert (only_codes.images, only_codes.generator_batches, only_codes.latents.shape) == ([], [], (1, 10, 512))
    assert refused(b"", "/v1/edits", "GET") == (405, "GET is not allowed on /v1/edits")
    assert refused(b"", "/v2/things", "GET")[0] == 404
    assert client.health()["status"] == "ok"
    assert len(client.edit(bundle=BUNDLE, prompt=PROMPT, latents=np.zeros((1, 10, 512), np.float32)).images) == 1


class StoppingServer:
    """What serve_command needs of a started server, without Ray: its address, and a stop that may be interrupted."""

    def __init__(self, interrupted_stop: bool) -> None:
        self.url = "http://127.0.0.1:8000"
        self.ray_logs = None
        self.interrupted_stop = interrupted_stop
        self.stops = 0

    def drain(self) -> int:
        return 0

    def stop(self, grace_s: float | None = None) -> None:
        self.stops += 1
        if self.interrupted_stop:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("interrupted_stop", "status", "last_line"),
    [(False, 0, "stopped"), (True, 130, "stopped before Ray finished shutting down")],
)
def test_ctrl_c_stops_the_server_without_an_error(
    cli, monkeypatch, tmp_path: Path, interrupted_stop: bool, status: int, last_line: str
) -> None:
    import sys
    import time
    import types

    server = StoppingServer(interrupted_stop)
    started = types.ModuleType("cfdeploy.serving.server")
    started.ServeSettings = lambda *settings: settings
    started.Server = lambda settings, ray_address, verbose: server
    monkeypatch.setitem(sys.modules, "cfdeploy.serving.server", started)

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    result = cli("serve", "--bundle", tmp_path / BUNDLE)
    assert result.exit_code == status and server.stops == 1
    assert result.stderr.splitlines()[-2:] == [
        "stopping: edits in flight have 20 s to finish (Ctrl-C again: stop now)",
        last_line,
    ]
    assert "error" not in result.stderr


def test_the_client_sends_landmarks_given_as_an_array():
    """A plain HTTP server records the body; the client's JSON holds the points as lists."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    received: list[dict] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = json.dumps({"error": "recorded"}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    points = np.array([[[10.0, 20.0], [30.0, 20.0], [20.0, 30.0], [12.0, 40.0], [28.0, 40.0]]])
    with ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        client = Client(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ServerError, match="recorded"):
            client.edit(bundle="b", prompt="p", image=b"photo", landmarks=points, returns="photo")
        server.shutdown()
    assert received[0]["landmarks"] == points.tolist()
