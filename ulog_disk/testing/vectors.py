"""The golden vectors of ``formats/vectors/*``: one JSON file a vector, read the same way by every
format's tests."""

from __future__ import annotations

import json
from pathlib import Path


def golden_vectors(directory: Path, kind: str | None = None) -> list[tuple[str, dict]]:
    """(name, vector) of every vector in ``directory``, in name order; with ``kind``, only that kind's
    (the vector's ``kind`` field)."""
    found = []
    for path in sorted(directory.glob("*.json")):
        vec = json.loads(path.read_text())
        if kind is None or vec["kind"] == kind:
            found.append((path.stem, vec))
    return found
