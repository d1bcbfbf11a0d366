"""The ASGI app the partialseg MONAI Label server runs: MONAI Label's, with safe defaults.

``monailabel start_server ... --uvicorn_app partialseg.monailabel.server:app`` (``python -m
partialseg.monailabel start`` passes it) runs MONAI Label's own FastAPI app with:

- **CORS limited** to the server's own origin (``http://127.0.0.1:PORT``, ``http://localhost:PORT``)
  and the origins an operator lists (``--conf cors_origins "https://a.example,https://b.example"``
  or MONAI Label's ``MONAI_LABEL_CORS_ORIGINS``); MONAI Label's default (``*`` with credentials)
  let any web page an annotator opened call the API. ``*`` is refused.
- :class:`RequestGuard`, before MONAI Label's endpoints:

  - ``PUT`` / ``DELETE /model/<bundle>`` (replace or move away the served weights) answer 403
    unless ``--conf allow_model_upload true``;
  - ``image``, ``tag``, ``id`` and ``label`` names of ``/datastore`` requests must be safe names
    (:func:`~partialseg.monailabel.request_checks.safe_name`);
  - ``POST /train/<bundle>`` is checked by the app (:meth:`PartialSegApp.check_train_request
    <partialseg.monailabel.app.PartialSegApp.check_train_request>`: override values, bounds,
    the run_sync size) before MONAI Label starts a training process, so a bad request is a 4xx
    answer, not a failed background task;
  - an exception in an endpoint becomes a JSON answer with the reason (``{"detail": ...}``: 400
    for a ``ValueError`` such as a malformed ``params`` JSON, 404 for an unknown image, 500
    otherwise) instead of a bare ``Internal Server Error``.

:class:`~partialseg.monailabel.app.PartialSegApp` refuses to serve from a server without this app.

Example:
    >>> from fastapi import FastAPI
    >>> demo = secure(FastAPI(), {"cors_origins": "https://viewer.example/"}, port=8000)
    >>> demo.state.partialseg_guard["cors_origins"]
    ['http://127.0.0.1:8000', 'http://localhost:8000', 'https://viewer.example']
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from partialseg.monailabel.request_checks import RequestError, safe_name

__all__ = ["RequestGuard", "cors_origins", "secure"]

logger = logging.getLogger(__name__)

#: query parameters of ``/datastore`` requests that name files
NAME_FIELDS = ("image", "tag", "id", "label")
#: largest train request body read by the guard
MAX_TRAIN_BODY = 1 << 20
_TRUE = ("1", "true", "t", "yes", "y", "on")  # what FastAPI reads as a true bool


def _flag(conf: dict[str, Any], key: str) -> bool:
    value = str(conf.get(key, "false")).strip().lower()
    if value not in _TRUE + ("0", "false", "f", "no", "n", "off", ""):
        raise ValueError(f"--conf {key} must be true or false, got {conf.get(key)!r}")
    return value in _TRUE


def cors_origins(conf: dict[str, Any], port: int, env: list[Any] | None = None) -> list[str]:
    """The origins allowed to call the server from a browser: its own (``127.0.0.1`` and
    ``localhost`` on ``port``) and those of ``--conf cors_origins`` (comma-separated)
    and ``env`` (MONAI Label's ``MONAI_LABEL_CORS_ORIGINS``), trailing ``/`` removed.

    Raises:
        ValueError: an origin ``*`` (any page could then drive the server with the user's
            credentials), or one that is not ``http(s)://host[:port]``.
    """
    own = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    listed = [o.strip() for o in str(conf.get("cors_origins") or "").split(",") if o.strip()] + [str(o) for o in env or []]
    origins = []
    for origin in listed:
        origin = origin.rstrip("/")
        if origin == "*" or not origin.startswith(("http://", "https://")) or "/" in origin.split("://", 1)[1]:
            raise ValueError(f"--conf cors_origins / MONAI_LABEL_CORS_ORIGINS: {origin!r} is not an origin http(s)://host[:port] ('*' is refused)")
        origins.append(origin)
    return list(dict.fromkeys(own + origins))


class RequestGuard:
    """ASGI middleware in front of MONAI Label's endpoints (module docstring).

    Args:
        app: the ASGI app it guards.
        allow_model_upload: let ``PUT`` / ``DELETE /model/<bundle>`` through.
        prefix: MONAI Label's API prefix (``MONAI_LABEL_API_STR``, usually empty).
        check_train: ``(model or None, params, run_sync) -> None``, raising ``RequestError``; by
            default the app instance's ``check_train_request``.
    """

    def __init__(self, app: Any, allow_model_upload: bool = False, prefix: str = "", check_train: Any = None) -> None:
        self.app = app
        self.allow_model_upload = allow_model_upload
        self.prefix = prefix
        self.check_train = check_train or _check_train

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"][len(self.prefix) :] if scope["path"].startswith(self.prefix) else scope["path"]
        method = scope["method"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        try:
            if path.startswith("/model/") and method in ("PUT", "DELETE") and not self.allow_model_upload:
                raise RequestError(
                    f"{method} {path} would replace the served model: uploads are off on this server"
                    " (start it with --conf allow_model_upload true to allow them)", 403
                )  # fmt: skip
            if path.startswith("/datastore"):
                for field in NAME_FIELDS:
                    for value in query.get(field, []):
                        safe_name(value, field)
            if method == "POST" and (path == "/train" or path.startswith("/train/")):
                body = await _read_body(receive)
                receive = _replay(body)
                try:
                    params = json.loads(body) if body.strip() else {}
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise RequestError(f"the train request body is not JSON: {e}") from None
                if params is not None and not isinstance(params, dict):
                    raise RequestError(f"the train request body must be a JSON object, got {type(params).__name__}")
                run_sync = any(v.strip().lower() in _TRUE for v in query.get("run_sync", []))
                model = path[len("/train") :].strip("/") or None
                self.check_train(model, params or {}, run_sync)
        except RequestError as e:
            await JSONResponse({"detail": e.detail}, status_code=e.status_code)(scope, receive, send)
            return

        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - every error reaches the client as JSON with its reason
            if started:
                raise
            status = _status(e)
            logger.exception(f"{method} {path}: {type(e).__name__}: {e}")
            await JSONResponse({"detail": f"{type(e).__name__}: {_message(e)}"}, status_code=status)(scope, receive, send)


def _status(e: Exception) -> int:
    name = type(e).__name__
    if name in ("ImageNotFoundException", "LabelNotFoundException"):
        return 404
    if isinstance(e, ValueError) or getattr(getattr(e, "error", None), "value", None) == "INVALID_INPUT":
        return 400
    return 500


def _message(e: Exception) -> str:
    return str(getattr(e, "msg", None) or e)


async def _read_body(receive: Any) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_TRAIN_BODY:
            raise RequestError(f"the train request body is larger than {MAX_TRAIN_BODY} bytes", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _check_train(model: str | None, params: dict[str, Any], run_sync: bool) -> None:
    from monailabel.interfaces.utils.app import app_instance

    instance = app_instance()
    models = [model] if model else list(instance.info()["trainers"])
    for m in models:
        # what MONAI Label's AsyncTask hands the task: the model's own params, then the whole body
        request = {**(params.get(m) if not model and isinstance(params.get(m), dict) else {}), **params}
        instance.check_train_request(m, request, run_sync)


def secure(app: Any, conf: dict[str, Any] | None = None, port: int | None = None) -> Any:
    """Install the safe CORS policy and :class:`RequestGuard` on a FastAPI ``app`` that has not
    started; returns it. ``conf`` and ``port`` default to MONAI Label's settings (``--conf``,
    ``--port``)."""
    from monailabel.config import settings

    conf = settings.MONAI_LABEL_APP_CONF if conf is None else conf
    port = settings.MONAI_LABEL_SERVER_PORT if port is None else port
    origins = cors_origins(conf, port, settings.MONAI_LABEL_CORS_ORIGINS if conf is settings.MONAI_LABEL_APP_CONF else None)
    upload = _flag(conf, "allow_model_upload")
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.add_middleware(RequestGuard, allow_model_upload=upload, prefix=settings.MONAI_LABEL_API_STR)
    # outermost: preflight requests are answered, and the guard's answers carry the CORS headers
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    app.state.partialseg_guard = {"cors_origins": origins, "allow_model_upload": upload}
    logger.info(f"partialseg server: CORS origins {origins}; model upload {'on' if upload else 'off'}")
    return app


_APP: Any = None


def __getattr__(name: str) -> Any:
    # ``app`` is built on first access (uvicorn's "module:app"), so importing this module has no effect
    global _APP
    if name == "app":
        if _APP is None:
            from monailabel.app import app as monailabel_app

            _APP = secure(monailabel_app)
        return _APP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
