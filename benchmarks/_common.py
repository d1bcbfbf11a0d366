"""Helpers shared by the benchmark scripts (``dcl_*``, ``dtml_*``, ``atlas_*``, ``hybrid_*``).

* :func:`interleaved`: median seconds of functions called in turn (ABAB...), so that load from
  other processes hits every side alike; optionally CPU time and minor page faults per call;
* :func:`read_runs` / :func:`append_run`: the JSONL run file behind ``--resume`` (one finished
  run per line, appended as soon as it finishes);
* :func:`update_results_md`: replace one ``## `` section of ``docs/results.md``, leaving the others,
  and only while nobody has edited it by hand;
* :func:`rel`: a path relative to the repository root where it lies inside it;
* :func:`retain_freed_memory` / :func:`set_malloc`: the ``--malloc retain`` option of the speed
  benchmarks (glibc keeps freed memory for the whole process).

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


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc): no trimming of the heap, no mmap for large blocks.

    By default glibc returns large freed blocks to the system (``munmap``, heap trimming) and the
    next iteration faults the pages in again; a larger working set (two networks' graphs) pays
    more of this than a smaller one. ``mallopt(M_TRIM_THRESHOLD)`` and ``mallopt(M_MMAP_THRESHOLD)``
    (the ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` environment variables) turn it off
    for the whole process, as GPU caching allocators do. Returns False where it is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-1, 1 << 30)) and bool(libc.mallopt(-3, 1 << 30))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def set_malloc(choice: str) -> None:
    """Apply a speed benchmark's ``--malloc`` choice (``"default"`` or ``"retain"``); exits where ``retain`` is impossible."""
    if choice == "retain" and not retain_freed_memory():
        raise SystemExit("--malloc retain needs glibc (mallopt)")


def read_runs(path: str | Path, config: dict | None = None) -> list[dict]:
    """The runs of a JSONL run file (one JSON object per non-empty line); [] when it does not exist.

    ``config``: only the runs made with this configuration (their ``"config"`` entry).
    """
    path = Path(path)
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return runs if config is None else [r for r in runs if r.get("config") == config]


def start_afresh(path: str | Path) -> list[dict]:
    """A run without ``--resume``: the run file removed; returns the (no) runs to skip."""
    Path(path).unlink(missing_ok=True)
    return []


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


def _stamp(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.strip().encode()).hexdigest()[:12]


STAMP = "<!-- generated by a benchmark script, unedited: {} -->"


def save_report(results: dict, out: str | Path, text: str, header: str, docs: bool = True) -> None:
    """A speed benchmark's results as ``out`` (JSON) and its report beside it (``.md``); with ``docs``
    also its section ``header`` of docs/results.md (:func:`update_results_md`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(text.rstrip("\n") + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if docs:
        update_results_md(text, header=header)


def update_results_md(section_text: str, path: Path = ROOT / "docs" / "results.md", header: str | None = None) -> bool:
    """Replace (or append) the section ``header`` (default: the first line of ``section_text``) of
    docs/results.md, leaving every other section alone; written through a temporary file.

    A section is replaced only while it is exactly what a script wrote (a stamp with the hash of
    the text ends it): once a person has edited it (an analysis added below the table, a row
    explained) or for a section without a stamp, nothing is replaced and a note on stderr says
    so, since the script's own report file holds the new text. Returns whether the file changed.
    """
    import re
    import sys

    header = section_text.splitlines()[0] if header is None else header
    body = section_text.rstrip("\n") + "\n\n" + STAMP.format(_stamp(section_text)) + "\n"
    old = path.read_text() if path.is_file() else "# Results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == header), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        current = "".join(lines[start:end]).rstrip("\n")
        m = re.search(r"\n*<!-- generated by a benchmark script, unedited: ([0-9a-f]+) -->$", current)
        if m is None or m.group(1) != _stamp(current[: m.start()]):
            print(f"note: the section {header!r} of {rel(path)} holds text written by hand: not replaced (the script's"
                  " report holds the new text; merge it by hand)", file=sys.stderr)  # fmt: skip
            return False
        new = "".join(lines[:start]) + body + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return True
