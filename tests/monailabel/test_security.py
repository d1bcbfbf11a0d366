"""The server's safe defaults without starting MONAI Label: CORS origins, the request guard in front
of a real FastAPI app (TestClient), the app's run_sync bound and its refusal to serve unguarded.
tests/monailabel/test_server.py sends the same attacks to a real server."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("monailabel")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from partialseg.monailabel.request_checks import RequestError  # noqa: E402
from partialseg.monailabel.server import RequestGuard, cors_origins, secure  # noqa: E402

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def test_cors_origins_are_the_servers_own_and_the_listed_ones():
    assert cors_origins({}, 8000) == ["http://127.0.0.1:8000", "http://localhost:8000"]
    got = cors_origins({"cors_origins": "https://viewer.example/, http://10.0.0.5:3000"}, 8001, env=["https://ohif.example/"])
    assert got == ["http://127.0.0.1:8001", "http://localhost:8001", "https://viewer.example", "http://10.0.0.5:3000", "https://ohif.example"]
    for bad in ("*", "viewer.example", "https://viewer.example/path"):
        with pytest.raises(ValueError, match="is not an origin"):
            cors_origins({"cors_origins": bad}, 8000)


def _guarded(upload: bool = False, seen: list | None = None) -> TestClient:
    api = FastAPI()

    @api.put("/model/{model}")
    def put_model(model: str):
        return {"replaced": model}

    @api.put("/datastore/label")
    def save_label(image: str, tag: str = "final"):
        return {"image": image, "tag": tag}

    @api.post("/train/{model}")
    def train(model: str, params: dict | None = None):
        return {"model": model, "params": params}

    @api.get("/fails/{kind}")
    def fails(kind: str):
        raise json.JSONDecodeError("Expecting value", "{x", 1) if kind == "value" else RuntimeError("disk full")

    def check(model, params, run_sync):
        seen.append((model, params, run_sync)) if seen is not None else None
        if "overrides" in params:
            raise RequestError(f"{model}: overrides['learning_rate'] is a config expression")

    api.add_middleware(RequestGuard, allow_model_upload=upload, check_train=check)
    return TestClient(api, raise_server_exceptions=False)


def test_the_guard_refuses_before_the_endpoints_and_answers_json():
    seen: list = []
    client = _guarded(seen=seen)
    r = client.put("/model/m")
    assert r.status_code == 403 and "allow_model_upload" in r.json()["detail"]
    assert _guarded(upload=True).put("/model/m").json() == {"replaced": "m"}
    for tag in ("../../x", "/abs/x", ".."):
        r = client.put("/datastore/label", params={"image": "a", "tag": tag})
        assert r.status_code == 400 and "is not a safe name" in r.json()["detail"]
    assert client.put("/datastore/label", params={"image": "case 1.v2", "tag": "final"}).json() == {"image": "case 1.v2", "tag": "final"}
    # train requests: checked with the body the endpoint then reads unchanged
    r = client.post("/train/m", params={"run_sync": "true"}, json={"max_epochs": 2})
    assert r.json() == {"model": "m", "params": {"max_epochs": 2}} and seen[-1] == ("m", {"max_epochs": 2}, True)
    r = client.post("/train/m", json={"overrides": {"learning_rate": "$x"}})
    assert r.status_code == 400 and r.json() == {"detail": "m: overrides['learning_rate'] is a config expression"}
    r = client.post("/train/m", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["detail"]
    # an endpoint's exception: JSON with the reason (was a bare "Internal Server Error")
    r = client.get("/fails/value")
    assert r.status_code == 400 and r.json()["detail"].startswith("JSONDecodeError: Expecting value")
    r = client.get("/fails/other")
    assert r.status_code == 500 and r.json() == {"detail": "RuntimeError: disk full"}


def test_secure_replaces_the_any_origin_policy():
    from starlette.middleware.cors import CORSMiddleware

    api = FastAPI()
    api.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    secure(api, {}, port=8123)

    @api.get("/info/")
    def info():
        return {}

    client = TestClient(api)
    preflight = {"Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/info/", headers={"Origin": "http://evil.example", **preflight}).headers
    own = client.options("/info/", headers={"Origin": "http://localhost:8123", **preflight})
    assert own.headers["access-control-allow-origin"] == "http://localhost:8123"
    assert sum(m.cls is CORSMiddleware for m in api.user_middleware) == 1


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from partialseg.monailabel.app import PartialSegApp

    tmp = tmp_path_factory.mktemp("app")
    studies = tmp / "studies"
    studies.mkdir()
    return PartialSegApp(str(tmp / "app"), str(studies), {"bundles": str(BUNDLES), "max_sync_train_iterations": "10"})


def test_run_sync_trainings_are_bounded_and_errors_are_http_answers(app):
    bundle = "marginal_exclusion_abdomen"
    assert app.check_train_request(bundle, {"max_epochs": 5, "iterations_per_epoch": 2}, run_sync=True)["max_epochs"] == 5
    with pytest.raises(RequestError, match="at most 10 iterations.*this one 12") as e:
        app.check_train_request(bundle, {"max_epochs": 6, "iterations_per_epoch": 2}, run_sync=True)
    assert e.value.status_code == 422
    # an override of iterations_per_epoch counts too; a background training may be longer
    with pytest.raises(RequestError, match="this one 30"):
        app.check_train_request(bundle, {"max_epochs": 3, "overrides": {"iterations_per_epoch": 10}}, run_sync=True)
    assert app.check_train_request(bundle, {"max_epochs": 100, "iterations_per_epoch": 20})["max_epochs"] == 100
    with pytest.raises(RequestError, match="no train task 'nope'") as e:
        app.check_train_request("nope", {})
    assert e.value.status_code == 404
    # the app's datastore: unsafe names refused, annotated classes of some served bundle only
    with pytest.raises(RequestError, match="not a safe name"):
        app.datastore().save_label("x", "/tmp/x.nii.gz", "../x", {})
    with pytest.raises(RequestError, match="'heart' is not a class of any served bundle"):
        app._check_label_info("x", {"annotated": ["liver", "heart"]})
    app._check_label_info("x", {"annotated": ["LV"]})  # a DCL class: the DCL task will use it
    with pytest.raises(RequestError, match="index 9 is outside 0..6"):
        app._check_label_info("x", {"annotated": [9]})


def test_the_app_refuses_to_serve_without_the_guard(app, monkeypatch):
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=FastAPI()))
    with pytest.raises(RuntimeError, match="--uvicorn_app partialseg.monailabel.server:app"):
        app.server_mode(True)
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=secure(FastAPI(), {}, port=8000)))
    app.server_mode(True)
    app.server_mode(False)


def test_the_launcher_starts_the_guarded_app(tmp_path, monkeypatch):
    from partialseg.monailabel import __main__ as launcher

    calls = []
    monkeypatch.setattr(launcher.os, "execv", lambda exe, cmd: calls.append(cmd))
    assert launcher.main(["start", "--studies", str(tmp_path / "s"), "--app", str(tmp_path / "a")]) == 0
    cmd = calls[0]
    assert cmd[cmd.index("--uvicorn_app") + 1] == "partialseg.monailabel.server:app" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    shutil.rmtree(tmp_path / "a")
