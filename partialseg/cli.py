"""The ``partialseg`` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import only ``argparse`` at module level, so ``partialseg
--help`` stays fast; the heavy imports (torch, MONAI) happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "check": ("partialseg.data.check", "validate a partial-label dataset and print a per-source summary"),
    "plan": ("partialseg.data.plan", "fingerprint a dataset and plan a bundle's spacing, patch, batch, network, normalisation and classes (plan.json)"),
    "make-data": ("partialseg.data.synthetic.cli", "generate a synthetic benchmark (cardiac2d, abdomen3d, polyp2d, atrium3d)"),
    "evaluate": ("partialseg.evaluation", "Dice, Jaccard, HD95 / ASSD (mm), 95HD / ASD (voxels) of predictions against a dataset's references"),
    "build-atlas": ("partialseg.data.atlas", "build the atlas method's probabilistic atlas of a dataset (mean organ masks in the body-cropped frame, per-organ counts)"),
    "build-datalist": ("partialseg.data.builders", "join public datasets (BTCV, MSD, KiTS layouts) into one partial-label dataset.json, or slice ACDC / MSCMRseg into a 2D one"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partialseg", description=__doc__.splitlines()[0])
    from partialseg import __version__

    parser.add_argument("--version", action="version", version=f"partialseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
