"""``python -m partialseg.monailabel``: write a MONAI Label app folder, or start a server on it.

    python -m partialseg.monailabel init APP_DIR
    python -m partialseg.monailabel start --studies STUDIES [--app APP_DIR] [--host 127.0.0.1]
        [--port 8000] [--bundles DIR] [--conf KEY VALUE ...]

``start`` runs ``monailabel start_server --app APP_DIR --studies STUDIES --host HOST --port PORT
--uvicorn_app partialseg.monailabel.server:app`` (the server writes ``model/``, ``logs/``, ``bin/``
into APP_DIR and its datastore files into STUDIES; the ASGI app adds the safe defaults of
docs/serving.md, Security: CORS limited to the server's origin, model upload off, requests checked).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MAIN_PY = '''"""MONAI Label app: partialseg bundles (written by `python -m partialseg.monailabel init`)."""

from partialseg.monailabel.app import PartialSegApp  # noqa: F401  (monailabel picks the MONAILabelApp subclass)
'''


def init_app(app_dir: str | os.PathLike) -> Path:
    """Create ``app_dir`` with the ``main.py`` MONAI Label loads; returns the folder.

    An existing ``main.py`` that is not partialseg's is kept: ``FileExistsError`` naming it (an
    app folder of another MONAI Label app is never overwritten).
    """
    app = Path(app_dir).resolve()
    main_py = app / "main.py"
    if main_py.is_file() and main_py.read_text() != MAIN_PY:
        raise FileExistsError(f"{main_py} exists and is not partialseg's app: choose another app folder (it is left as it is)")
    app.mkdir(parents=True, exist_ok=True)
    if not main_py.is_file():
        main_py.write_text(MAIN_PY)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m partialseg.monailabel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write a MONAI Label app folder (main.py) for partialseg's bundles")
    p.add_argument("app_dir")
    p = sub.add_parser("start", help="init the app folder and run `monailabel start_server` on it")
    p.add_argument("--studies", required=True, help="images folder (MONAI Label local datastore)")
    p.add_argument("--app", default="monailabel_app", help="app folder (created; default ./monailabel_app)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--bundles", default=None, help="bundles folder (default: the repository's bundles/)")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    try:
        app = init_app(args.app_dir if args.command == "init" else args.app)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "init":
        print(app)
        return 0
    try:
        import monailabel  # noqa: F401
    except ImportError:
        print("error: monailabel is not installed: pip install -e '.[monailabel]' (see docs/serving.md)", file=sys.stderr)
        return 2
    conf = list(args.conf) + ([["bundles", str(Path(args.bundles).resolve())]] if args.bundles else [])
    # what the `monailabel` script runs, without its shell word-splitting of --conf values
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app),
           "--studies", str(Path(args.studies).resolve()), "--host", args.host, "--port", str(args.port),
           "--uvicorn_app", "partialseg.monailabel.server:app"]  # fmt: skip
    for key, value in conf:
        cmd += ["--conf", key, value]
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
