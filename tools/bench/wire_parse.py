"""Per-frame cost of decoding a request and building a reply: our wire layer vs alternatives.

Run: .venv/bin/python tools/bench/wire_parse.py   (figures go in docs/transport.md)
"""

from __future__ import annotations

import timeit

from pyroute2.netlink import nlmsg

from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Reply, Request, RequestType

N = 50_000


class UlogNlmsg(nlmsg):
    """The same layout as a pyroute2 message class (what using pyroute2 would take)."""

    fields = (
        ("idx", "I"), ("val", "I"), ("seq", "I"), ("ack", "I"), ("len", "H"), ("flags", "H"),
        ("luid", "Q"), ("uuid", "129s"), ("padding", "3s"), ("version", "I"), ("error", "i"),
        ("rseq", "I"), ("request_type", "I"), ("data_size", "I"), ("region", "Q"),
    )


def per_call(fn: object) -> float:
    return timeit.timeit(fn, number=N) / N * 1e6  # type: ignore[arg-type]


def main() -> None:
    req = Request(luid=0xFFFF8D8142769400, uuid="LVM-abc", version=3, seq=5,
                  request_type=RequestType.IN_SYNC, data=wire.build_u64(3))
    datagram = wire.add_nlmsghdr(wire.encode_request(req))
    ours = per_call(lambda: wire.decode_frame(wire.strip_nlmsghdr(datagram)[1]))
    cn_compiled, header_compiled = wire.CnMsg.compile(), wire.UlogHeader.compile()
    compiled = per_call(lambda: (cn_compiled.parse(datagram[16:36]), header_compiled.parse(datagram[36:196])))
    interpreted = per_call(lambda: (wire.NlMsgHdr.parse(datagram[:16]), wire.CnMsg.parse(datagram[16:36]),
                                    wire.UlogHeader.parse(datagram[36:196])))

    def pyroute2_decode() -> None:
        msg = UlogNlmsg(datagram)
        msg.decode()

    theirs = per_call(pyroute2_decode)
    build = per_call(lambda: wire.add_nlmsghdr(wire.encode_reply(Reply(req, 0, wire.build_s64(1)))))

    def pyroute2_build() -> None:
        msg = UlogNlmsg()
        msg["header"]["type"] = wire.NLMSG_DONE
        for key, value in dict(idx=7, val=1, seq=5, ack=0, len=168, flags=0, luid=req.luid,
                               uuid=b"LVM-abc", padding=b"", version=3, error=0, rseq=5,
                               request_type=8, data_size=8, region=1).items():
            msg[key] = value
        msg.encode()

    their_build = per_call(pyroute2_build)
    print(f"decode: wire {ours:.2f} us | construct compiled {compiled:.2f} us"
          f" | construct {interpreted:.2f} us | pyroute2 {theirs:.2f} us ({theirs / ours:.1f}x wire)")
    print(f"build:  wire {build:.2f} us | pyroute2 {their_build:.2f} us ({their_build / build:.1f}x wire)")


if __name__ == "__main__":
    main()
