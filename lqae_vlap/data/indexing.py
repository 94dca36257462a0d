"""The index check every random-access source shares."""

from __future__ import annotations

import operator


def check_index(index: int, length: int, what: str) -> int:
    """``index`` (negative counts from the end, as for a list) as a position in [0, length);
    anything else is an IndexError naming ``what``, the source."""
    i = operator.index(index)
    if not -length <= i < length:
        raise IndexError(f"index {index} out of range for {what} of length {length}")
    return i % length
