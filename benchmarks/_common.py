"""Helpers shared by the benchmark scripts (``dcl_ablation``, ``dcl_speed``, ``dtml_ablation``, ``dtml_speed``).

* :func:`interleaved`: median seconds of functions called in turn (ABAB...), so that load from
  other processes hits every side alike; optionally CPU time and minor page faults per call;
* :func:`read_runs` / :func:`append_run`: the JSONL run file behind ``--resume`` (one finished
  run per line, appended as soon as it finishes);
* :func:`update_results_md`: replace one ``## `` section of ``docs/results.md``, leaving the others;
* :func:`rel`: a path relative to the repository root where it lies inside it.

The scripts import it from their own folder (``sys.path`` holds it when a script is run, and the
scripts add it when they are loaded by file path, as the tests do).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def interleaved(*fns: Callable[[], object], repeats: int, warmup: int = 2, detail: list | None = None) -> list[float]:
    """Median seconds of each function, called in turn (ABAB...) ``repeats`` times after a warm-up.

    ``detail`` (a list) receives one dict per function: the median wall and CPU (process) seconds
    and the median number of minor page faults per call (``getrusage``; 0 where unavailable).
    """
    try:
        import resource

        def faults() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on Windows

        def faults() -> int:
            return 0

    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    flt: list[list[int]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            n0, c0, t = faults(), time.process_time(), time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
            cpu[i].append(time.process_time() - c0)
            flt[i].append(faults() - n0)
    if detail is not None:
        detail.extend({"wall_s": statistics.median(a), "cpu_s": statistics.median(b), "minor_faults": statistics.median(c)}
                      for a, b, c in zip(times, cpu, flt))
    return [statistics.median(ts) for ts in times]


def read_runs(path: str | Path) -> list[dict]:
    """The runs of a JSONL run file (one JSON object per non-empty line); [] when it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_run(path: str | Path, run: dict) -> None:
    """Append one finished run to the JSONL run file (its folder created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(run) + "\n")


def rel(path: str | Path) -> str:
    """``path`` relative to the repository root when inside it, else absolute."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def update_results_md(section_text: str, path: Path = ROOT / "docs" / "results.md", header: str | None = None) -> None:
    """Replace (or append) the section ``header`` (default: the first line of ``section_text``) of
    docs/results.md, leaving every other section alone; written through a temporary file."""
    header = section_text.splitlines()[0] if header is None else header
    old = path.read_text() if path.is_file() else "# Results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == header), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + section_text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section_text.rstrip("\n") + "\n" + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
