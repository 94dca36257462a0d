"""Reading a dataset's official JSON annotation file, with one-line errors that name the file.

The evaluation datasets (NoCaps, Karpathy's Flickr30k / COCO splits) ship one JSON file each; a
wrong path, a truncated download or another dataset's file must stop a run with one line naming
the file, the key and the fix (``main`` prints ``ValueError`` / ``FileNotFoundError`` as one
``error:`` line), never with a traceback from deep inside the evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def read_json(path: str | os.PathLike, *, what: str, how_to: str) -> Any:
    """The parsed JSON file at ``path``.

    Args:
      path: the file.
      what: what the file is, for the messages ("NoCaps annotations").
      how_to: where the file comes from, appended to every message.

    Raises FileNotFoundError when ``path`` is empty or not a file, ValueError when it is not JSON.
    """
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(f"{what}: no file given; {how_to}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} not found; {how_to}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno}); a truncated download? {how_to}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({e.reason}); {how_to}") from e


def field(record: Any, key: str, kind: type | tuple[type, ...], *, where: str) -> Any:
    """``record[key]``, checked to be of ``kind``; ValueError naming ``where`` and the key."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, not a JSON object")
    if key not in record:
        raise ValueError(f"{where} has no {key!r} (keys: {sorted(record)[:8]})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = (kind if isinstance(kind, tuple) else (kind,))
        raise ValueError(f"{where}: {key!r} must be {' or '.join(k.__name__ for k in names)}, "
                         f"got {type(value).__name__}")
    return value
