"""The floor of the request-rate benchmark: the least a Python server can do per request.

Listens on an AF_UNIX SOCK_SEQPACKET socket (the daemon's unix transport), accepts connections
one at a time and answers every packet with a packet of the size the daemon's reply has (the
request padded to ``--reply-size`` bytes): a blocking ``recv`` and a ``send``, nothing else.

Run: python echo_server.py PATH READY_FILE [--reply-size N]
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("ready")
    p.add_argument("--reply-size", type=int, default=188)
    args = p.parse_args()
    path = Path(args.path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(8)
    Path(args.ready).write_text(f"{os.getpid()}\n")
    size = args.reply_size
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                if len(data) < size:
                    data += bytes(size - len(data))
                conn.send(data)


if __name__ == "__main__":
    main()
