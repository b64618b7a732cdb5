"""``struct`` forms generated from construct definitions: the speed of ``struct``, one layout.

construct builds a Container per parse (tens of microseconds per frame or record); ``struct``
takes well under one. The per-request paths (wire frames, journal records, the meta record of
every commit) use ``struct``, but never a layout written a second time by hand: each form is
generated here from the construct definition it stands for, with the same field order, and
checked against it (its size here, its bytes by the golden vectors and the modules' tests).
"""

from __future__ import annotations

import struct
from typing import Any

import construct as c


def _format_of(field: c.Construct) -> tuple[str | None, str] | None:
    """(byte order or None, ``struct`` code) of one fixed-size field, or None."""
    while isinstance(field, (c.Const, c.Enum)):
        field = field.subcon  # a Const is packed from the value the caller passes
    if isinstance(field, c.FormatField):
        return field.fmtstr[0], field.fmtstr[1:]
    if isinstance(field, c.Bytes) and isinstance(field.length, int):
        return None, f"{field.length}s"
    return None


def flat_struct(definition: c.Construct, *, prefix: bool = False) -> struct.Struct:
    """A ``struct.Struct`` of a construct Struct of fixed-size numbers and byte strings (or of
    one such field), field for field; ``Const`` fields are packed from the value passed.

    ``prefix``: only the fixed-size fields before the first that is not (the fixed part of a
    record that ends in strings). The byte order is the fields' own; they must agree.
    """
    if isinstance(definition, c.Struct):
        subcons = [sub for sub in definition.subcons if sub is not c.Terminated]
    else:
        subcons = [c.Renamed(definition, "value")]
    orders = set()
    codes = []
    for sub in subcons:
        fmt = _format_of(sub.subcon)
        if fmt is None:
            if prefix and codes:
                break
            raise TypeError(f"field {sub.name!r} is not a fixed-size field")
        if fmt[0] is not None:
            orders.add(fmt[0])
        codes.append(fmt[1])
    if len(orders) > 1:
        raise TypeError(f"fields of mixed byte order {sorted(orders)} in {definition}")
    packed = struct.Struct((orders.pop() if orders else "=") + "".join(codes))
    if not prefix:
        assert packed.size == sum(sub.sizeof() for sub in subcons), definition
    return packed


def const(definition: c.Struct, name: str) -> Any:
    """The value of the ``Const`` field ``name`` of a definition (a magic, a version)."""
    for sub in definition.subcons:
        if sub.name == name and isinstance(sub.subcon, c.Const):
            return sub.subcon.value
    raise KeyError(f"no Const field {name!r}")


def concat_structs(*parts: struct.Struct) -> struct.Struct:
    """One ``struct.Struct`` for layouts that follow each other (one unpack instead of several,
    on a per-request path). They must share a byte order without alignment ("=", "<", ">", "!")."""
    orders = {p.format[0] for p in parts}
    if len(orders) != 1 or orders <= {"@"}:
        raise TypeError(f"structs of mixed or native-aligned byte order: {[p.format for p in parts]}")
    joined = struct.Struct(orders.pop() + "".join(p.format[1:] for p in parts))
    assert joined.size == sum(p.size for p in parts)
    return joined
