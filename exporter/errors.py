"""The one exception type for user mistakes, and the one place library errors on input become it.

Anything raised as `UserError` is printed by the CLI as a single line (no traceback) and exits
with code 2; everything else is a bug and exits with code 3.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class ParityError(Exception):
    """An artifact failed its parity thresholds (exit code 1)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


@contextlib.contextmanager
def loading(path: Path | str, what: str, fix: str, problem: str | None = None) -> Iterator[None]:
    """Every exception a library raises while reading input from `path` becomes a UserError naming
    the file (exit 2): a file it cannot parse is bad input, whatever the library calls it.

    `what` names the kind of file ("golden data", "ONNX model"), `fix` what the user can do, `problem`
    replaces "cannot load the <what>" in the message. UserError
    passes through; MemoryError says the file asks for more memory than the machine has; a
    KeyboardInterrupt or SystemExit is not an input problem and passes through too."""
    try:
        yield
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{path}: the {what} asks for more memory than this machine has; {fix}") from None
    except Exception as exc:
        problem = problem or f"cannot load the {what}"
        raise UserError(f"{path}: {problem} ({type(exc).__name__}: {first_line(exc)}); {fix}") from None
