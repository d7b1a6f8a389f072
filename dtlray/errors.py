"""The one exception type users see.

Anything raised as :class:`DtlrayError` is a problem with the user's input or environment; its
message names what is wrong and how to fix it. The CLI prints it as one line (no traceback unless
``--debug``) and exits non-zero. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DtlrayError(Exception):
    """A user-facing error whose message says what is wrong and how to fix it."""
