"""``cfdeploy serve``'s back-pressure: past ``--max-ongoing`` a request gets a 503 at once, and the server keeps answering.

Its own server, with room for two requests (one replica taking one, one waiting), so a burst overflows it
however fast the machine drains requests.
"""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cfdeploy.client import Client, ServerError
from cfdeploy.serving.protocol import EditRequest, RequestError
from cfdeploy.serving.server import BundleEditor, Server, ServeSettings
from conftest import free_port, own_ray, ray_is_connected

PROMPT = "green lipstick"  # precomputed in bundle_64


def test_flooding_past_max_ongoing_gets_503_and_the_server_keeps_answering(bundle_64: Path) -> None:
    assert not ray_is_connected()
    settings = ServeSettings((bundle_64,), replicas=1, max_ongoing=1, port=free_port())
    w = np.zeros((1, 10, 512), np.float32)
    with own_ray() as our_ray:
        with Server(settings, num_cpus=2) as server:
            client = Client(server.url)

            def attempt(_: int) -> tuple[int, str]:
                try:
                    client.edit(prompt=PROMPT, latents=w, returns="npy" if _ % 2 else "png")
                    return 200, ""
                except ServerError as refusal:
                    return refusal.status, refusal.message

            with ThreadPoolExecutor(16) as flood:
                replies = list(flood.map(attempt, range(16)))
            statuses = [status for status, _ in replies]
            assert {message for _, message in replies} - {""} == {
                "bundle 'green_lipstick_64' is busy (its queue is full); retry later"
            }
            assert set(statuses) == {200, 503}, statuses  # how many are taken depends on Ray's routing; some always are
            assert len(client.edit(prompt=PROMPT, latents=w).images) == 1
        our_ray.assert_none_left()


def test_a_long_prompt_is_refused_while_another_request_holds_the_backend_thread(bundle_64: Path) -> None:
    """Byte-pair merging runs off the replica's one backend thread: a prompt of 1,999 letters is refused while that
    thread is busy with another request's networks, instead of queueing behind them and then holding them up."""
    editor = BundleEditor(str(bundle_64), "onnxruntime", {}, max_batch=1, batch_wait_s=0.0)
    busy = threading.Event()
    editor.runner.submit(busy.wait)
    request = EditRequest(
        bundle=bundle_64.name,
        prompt="a" * 1999,
        text_features=None,
        latents=np.zeros((1, 10, 512), np.float32),
        seed=None,
        num=1,
        truncation=1.0,
        image=None,
        strength=1.0,
        returns="npy",
    )
    try:
        reply = asyncio.run(asyncio.wait_for(editor.edit(request), timeout=20))
    finally:
        busy.set()
        editor.runner.shutdown()
    assert isinstance(reply, RequestError) and reply.status == 400
    assert re.fullmatch(r"prompt 'a+'… is \d+ tokens; CLIP reads at most 77", str(reply)), str(reply)
