"""The `partialseg` console command: entry point, help, and its promise to stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from partialseg.cli import COMMANDS, main

BIN = Path(sys.executable).parent / "partialseg"


def test_console_script_lists_every_command():
    out = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_help_and_parsing_import_neither_torch_nor_monai():
    code = "import sys, partialseg.cli as c; c.build_parser(); print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_version_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "partialseg 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train-everything"])
    assert e.value.code == 2
