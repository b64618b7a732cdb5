"""Where requests come from: the kernel's netlink connector, or a unix socket carrying the same
frames (tests, benchmarks, the kernel model). The daemon's loop sees only :class:`Transport`."""

from __future__ import annotations

import selectors
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

#: (connector payload, where its reply goes): what a transport hands the daemon for each frame.
Frame = tuple[bytes, object]


@dataclass
class Counters:
    """What every transport counts (the stop line prints them; a transport adds its own)."""

    received: int = 0
    sent: int = 0
    send_errors: int = 0


class Transport(Protocol):
    """A source of kernel frames and the way back for their replies.

    The daemon registers nothing itself: ``attach`` puts the transport's descriptors in the loop's
    selector (with data the transport recognises), ``readable`` turns one ready key into frames
    (accepting a connection, draining a socket; they may be read as the caller iterates, so that
    a request is answered before the next is looked for), ``queued`` drains every frame already waiting at
    stop, after ``stop_receiving``.
    """

    name: str
    counters: Counters

    def attach(self, selector: selectors.BaseSelector) -> None: ...

    def readable(self, key: selectors.SelectorKey, selector: selectors.BaseSelector) -> Iterable[Frame]: ...

    def queued(self) -> list[Frame]: ...

    def send(self, payload: bytes, address: object) -> None: ...

    def stop_receiving(self, selector: selectors.BaseSelector) -> None: ...

    def close(self) -> None: ...
