"""``python -m partialseg._native``: build (or find) the compiled loss kernels and print the path."""

import sys

from partialseg._native import build

try:
    print(f"partialseg native loss kernels: {build()}")
except RuntimeError as err:
    print(f"partialseg native loss kernels unavailable, the losses use torch ops: {err}", file=sys.stderr)
    sys.exit(1)
