"""Feedback on long work: a live line per stage on a terminal (spinner and elapsed time, Rich), one
line per finished stage with its time in logs (CI), so a minutes-long lowering is never silent."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from typing import Iterator


def _live() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """`label` live while the block runs; then "label: N.Ns" (also on failure, with "failed")."""
    start = time.perf_counter()
    ok = False
    try:
        if _live():
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            columns = (SpinnerColumn(), TextColumn(label), TimeElapsedColumn())
            with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
                progress.add_task(label, total=None)
                yield
        else:
            yield
        ok = True
    finally:
        log(f"{label}: {time.perf_counter() - start:.1f}s" + ("" if ok else " (failed)"))


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Third-party progress bars (coremltools' "Running MIL ... pipeline" tqdm bars write thousands of
    characters per export to CI logs) go nowhere; exceptions still propagate."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
