"""The one exception type for user mistakes.

Anything raised as `UserError` is printed by the CLI as a single line (no traceback) and exits
with code 2; everything else is a bug and exits with code 3.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class ParityError(Exception):
    """An artifact failed its parity thresholds (exit code 1)."""
