"""Error messages that stay short whatever the input: a value from a file a user handed us
(a config, a checkpoint's metadata, a job file) is shown cut, with how long it was."""

from __future__ import annotations

import reprlib

MAX_SHOWN = 120

# reprlib bounds the work as well as the text: it never formats more than a few items of a
# container, nor more than a few levels deep, so an alias bomb or a huge number costs nothing.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = MAX_SHOWN
_REPR.maxlong = 40


def clip(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long the value was."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        digits = int(value.bit_length() * 0.30103) + 1  # log10(2): str() of a huge int is refused
        return f"a number of about {digits:,} digits"
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails must not hide the real problem
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + "..."
    if isinstance(value, list | tuple | dict | set):
        text += f" ({type(value).__name__} of {len(value):,})"
    return text
