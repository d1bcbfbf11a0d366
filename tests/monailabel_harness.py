"""Shared helpers of the MONAI Label tests: a real server on 127.0.0.1, its requests, a fake datastore.

``tests/monailabel/test_server.py`` (every bundle, security) and the bundle-specific MONAI Label
tests (``tests/monailabel/test_atlas_server.py``) start their server with :func:`serve` and talk to
it with :func:`infer`, :func:`save_label`, :func:`set_image_info` and :func:`train`; the tests
of a train task without a server read a :class:`FakeDatastore`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """The environment of the server: the ``monailabel`` script runs the first ``python`` on PATH
    (this interpreter's); one thread, also in the trainings it starts."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, PATH=path, OMP_NUM_THREADS="1")


@contextmanager
def serve(app: Path, studies: Path, log_path: Path, bundle_overrides: dict[str, dict[str, Any]] | None = None,
          timeout: float = 120.0) -> Iterator[str]:  # fmt: skip
    """A ``monailabel start_server`` of ``app`` on ``studies`` (the documented command, partialseg's
    ASGI app, the repository's bundles); yields its URL once ``/info/`` answers, and ends it (its
    process group: the trainings it started too) on exit."""
    requests = pytest.importorskip("requests")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "monailabel")
    # the script splits its arguments on spaces (`$*`): compact JSON
    cmd = [exe, "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "bundles", str(REPO / "bundles"), "--conf", "bundle_overrides", json.dumps(bundle_overrides or {}, separators=(",", ":")),
           "--uvicorn_app", "partialseg.monailabel.server:app"]  # fmt: skip
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                pytest.fail("server did not start:\n" + Path(log_path).read_text()[-4000:])
            time.sleep(0.5)
        print(f"server answered /info/ after {time.monotonic() - t0:.1f} s")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def infer(url: str, image: str, model: str, params: dict | None = None) -> tuple[bytes, float]:
    """``POST /infer/<model>`` of a datastore image: the label file's bytes and the latency (s)."""
    import requests

    t = time.perf_counter()
    data = {"params": json.dumps(params)} if params else None
    r = requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"}, data=data, timeout=300)
    assert r.status_code == 200, r.text[:2000]
    return r.content, time.perf_counter() - t


def save_label(url: str, image: str, path: Path, params: dict | None = None) -> None:
    """``PUT /datastore/label`` (tag ``final``) with the label info ``params``."""
    import requests

    with open(path, "rb") as f:
        r = requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                         data={"params": json.dumps(params or {})}, files={"label": (Path(path).name, f)}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text[:2000]


def set_image_info(url: str, image: str, info: dict) -> None:
    """``PUT /datastore/image/info``: e.g. an image's ``modality``."""
    import requests

    r = requests.put(f"{url}/datastore/image/info", params={"image": image}, data={"info": json.dumps(info)}, timeout=60)
    assert r.status_code == 200, r.text[:2000]


def train(url: str, model: str, **params):
    """A ``run_sync`` ``POST /train/<model>`` with the request ``params``; the response."""
    import requests

    return requests.post(f"{url}/train/{model}", params={"run_sync": "true"}, json=params, timeout=600)


class FakeDatastore:
    """The datastore methods the train tasks read: ``{image_id: (image, label, label info)}``, and
    optionally ``{image_id: image info}``."""

    def __init__(self, cases: dict[str, tuple[Path, Path, dict]], image_info: dict[str, dict] | None = None) -> None:
        self.cases = cases
        self.image_info = image_info or {}

    def get_labeled_images(self):
        return list(self.cases)

    def get_image_uri(self, image_id):
        return str(self.cases[image_id][0])

    def get_label_uri(self, image_id, tag):
        return str(self.cases[image_id][1])

    def get_label_info(self, image_id, tag):
        return self.cases[image_id][2]

    def get_image_info(self, image_id):
        return dict(self.image_info.get(image_id, {}))
