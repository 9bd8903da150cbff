"""The two kinds of failure a user sees, and nothing else.

`UsageError` means the command or its input is wrong (exit 2); `FinetuneError` means the run
failed while doing what was asked (exit 1). Either prints as one line; `--debug` shows the trace.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class FinetuneError(Exception):
    """A runtime failure: the request was valid but could not be carried out (exit code 1)."""

    exit_code = 1


class UsageError(FinetuneError):
    """The user asked for something invalid: bad key, bad value, missing file (exit code 2)."""

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): library
    messages can run to hundreds of lines, and a user gets one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean a, b?)' for the closest choices, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not close:
        # A typo in the section part ("trian.max_steps") still has an exact leaf name.
        leaf = word.rsplit(".", 1)[-1]
        close = [c for c in choices if c.rsplit(".", 1)[-1] == leaf][:n]
    return f" (did you mean {', '.join(close)}?)" if close else ""
