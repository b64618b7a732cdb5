"""ulog_disk.protocol.wire: frame decoding errors, type masking, payload parsers.

Frames are built with wire's own encoders and then damaged through wire's construct definitions
(``CnMsg``/``UlogHeader``), so no offset is written down here.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.protocol import capture, requests, wire
from ulog_disk.protocol.wire import FrameError, Reply, Request, RequestType

UUID = "LVM-wiretest"
LUID = 0xFFFF8D8142769400


def request(type_: int = RequestType.IN_SYNC, data: bytes = b"\0" * 8, *, seq: int = 77, uuid: str = UUID,
            raw_type: int = 0) -> Request:
    return Request(luid=LUID, uuid=uuid, version=3, seq=seq, request_type=type_, data=data, cn_seq=seq,
                   raw_type=raw_type)


def frame(**kw) -> bytes:
    return wire.encode_request(request(**kw))


def patched(base: bytes, cn: dict | None = None, hdr: dict | None = None) -> bytes:
    """Rebuild ``base`` with some cn_msg / header fields replaced (via wire's definitions)."""
    c_size, h_size = wire.CN_MSG_SIZE, wire.HEADER_SIZE
    cn_msg = dict(wire.CnMsg.parse(base[:c_size]))
    header = dict(wire.UlogHeader.parse(base[c_size : c_size + h_size]))
    cn_msg.pop("_io", None)
    header.pop("_io", None)
    cn_msg.update(cn or {})
    header.update(hdr or {})
    return wire.CnMsg.build(cn_msg) + wire.UlogHeader.build(header) + base[c_size + h_size :]


def assert_answerable(exc: FrameError) -> None:
    """An answerable FrameError carries enough to address a -EINVAL reply that encodes."""
    assert exc.answerable and exc.request is not None
    assert exc.request.seq == 77 and exc.request.luid == LUID
    reply = wire.decode_reply(wire.encode_reply(Reply(exc.request, -errno.EINVAL)))
    assert (reply.seq, reply.error, reply.data) == (77, -errno.EINVAL, b"")


# --- FrameError ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, wire.CN_MSG_SIZE - 1])
def test_shorter_than_cn_msg_is_unanswerable(length):
    with pytest.raises(FrameError) as info:
        wire.decode_frame(frame()[:length])
    assert not info.value.answerable


@pytest.mark.parametrize("length", [wire.CN_MSG_SIZE, wire.CN_MSG_SIZE + 100,
                                    wire.CN_MSG_SIZE + wire.HEADER_SIZE - 1])
def test_incomplete_header_is_unanswerable(length):
    with pytest.raises(FrameError) as info:
        wire.decode_frame(frame()[:length])
    assert not info.value.answerable


@pytest.mark.parametrize("cn_id", [(7, 2), (8, 1), (0, 0), (1, 1), (7, 0x101)])
def test_wrong_connector_id_is_unanswerable(cn_id):
    bad = patched(frame(), cn={"idx": cn_id[0], "val": cn_id[1]})
    with pytest.raises(FrameError) as info:
        wire.decode_frame(bad)
    assert not info.value.answerable


def test_wrong_connector_id_is_checked_before_length():
    bad = patched(frame(), cn={"idx": 8})[: wire.CN_MSG_SIZE + 10]
    with pytest.raises(FrameError, match="connector id"):
        wire.decode_frame(bad)


@pytest.mark.parametrize("data_size", [9, 100, 0xFFFFFFFF])
def test_data_size_past_the_end_is_answerable(data_size):
    bad = patched(frame(), cn={"len": wire.HEADER_SIZE + data_size & 0xFFFF}, hdr={"data_size": data_size})
    with pytest.raises(FrameError, match="data_size") as info:
        wire.decode_frame(bad)
    assert_answerable(info.value)


@pytest.mark.parametrize("cn_len", [0, 1, wire.HEADER_SIZE, wire.HEADER_SIZE + 7, wire.HEADER_SIZE + 9,
                                    0xFFFF])
def test_cn_len_mismatch_is_answerable(cn_len):
    bad = patched(frame(), cn={"len": cn_len})
    with pytest.raises(FrameError, match="cn_msg.len") as info:
        wire.decode_frame(bad)
    assert_answerable(info.value)


def test_uuid_without_nul_is_answerable():
    raw = b"U" * wire.DM_UUID_LEN
    bad = patched(frame(), hdr={"uuid": raw})
    with pytest.raises(FrameError, match="NUL") as info:
        wire.decode_frame(bad)
    assert_answerable(info.value)
    assert info.value.request.uuid == raw.decode("latin-1")


def test_uuid_with_bytes_after_its_nul_is_answerable():
    bad = patched(frame(), hdr={"uuid": b"abc\0junk".ljust(wire.DM_UUID_LEN, b"\0")})
    with pytest.raises(FrameError, match="after its terminating NUL") as info:
        wire.decode_frame(bad)
    assert_answerable(info.value)
    assert info.value.request.uuid == "abc"


def test_frame_error_is_a_value_error():
    assert issubclass(FrameError, ValueError)
    assert not FrameError("x").answerable


# --- what decodes ----------------------------------------------------------------------------------


def test_round_trip_and_fields():
    f = frame(data=wire.build_u64(5))
    req = wire.decode_frame(f)
    assert (req.luid, req.uuid, req.version, req.seq, req.cn_seq) == (LUID, UUID, 3, 77, 77)
    assert req.kind is RequestType.IN_SYNC and req.key == (UUID, LUID)
    assert wire.parse_region(req.data) == 5
    assert wire.encode_request(req) == f


@pytest.mark.parametrize("container", [bytes, bytearray, memoryview])
def test_decode_accepts_buffers(container):
    f = frame()
    assert wire.decode_frame(container(f)).seq == 77


def test_bytes_past_cn_len_are_ignored():
    """Netlink pads to 4 bytes; the kernel's buffer may hold more than data_size."""
    f = frame(type_=RequestType.CTR, data=b"32768 core 1024")
    req = wire.decode_frame(f + b"\0\0\xff")
    assert req.data == b"32768 core 1024"


def test_max_kernel_request_size():
    data = b"x" * wire.MAX_REQUEST_DATA
    f = frame(type_=RequestType.CTR, data=data)
    assert len(f) == wire.DM_ULOG_PREALLOCED_SIZE
    assert wire.decode_frame(f).data == data


def test_uuid_of_128_bytes_and_latin1_round_trip():
    uuid = "A" * 126 + "/\xff"
    f = frame(uuid=uuid)
    assert wire.decode_frame(f).uuid == uuid
    assert wire.encode_request(wire.decode_frame(f)) == f
    with pytest.raises(ValueError):
        wire.encode_request(request(uuid="A" * 129))


@pytest.mark.parametrize("raw", [0x108, 0xFFFFFF08, 0x00ABCD08])
def test_request_type_upper_bits_are_masked(raw):
    req = wire.decode_frame(patched(frame(), hdr={"request_type": raw}))
    assert req.request_type == RequestType.IN_SYNC and req.kind is RequestType.IN_SYNC
    assert req.raw_type == raw
    # Re-encoding keeps the raw value; a reply echoes it (the kernel ignores it).
    assert wire.encode_request(req) == patched(frame(), hdr={"request_type": raw})
    rep = wire.encode_reply(Reply(req, 0, wire.build_s64(1)))
    assert wire.UlogHeader.parse(rep[wire.CN_MSG_SIZE :]).request_type == raw
    assert wire.decode_reply(rep).request_type == RequestType.IN_SYNC


@pytest.mark.parametrize("raw", [0, 0x100, 0xFFFF00])
def test_type_zero_after_masking(raw):
    req = wire.decode_frame(patched(frame(), hdr={"request_type": raw}))
    assert req.request_type == 0 and req.kind is None


@pytest.mark.parametrize("t", [18, 0x7F, 0xFF])
def test_unknown_type_decodes_without_kind(t):
    req = wire.decode_frame(patched(frame(), hdr={"request_type": t}))
    assert req.request_type == t and req.kind is None


def test_loop_requests_are_those_of_ref_1_7():
    T = RequestType
    expected = {T.IS_CLEAN, T.IN_SYNC, T.FLUSH, T.MARK_REGION, T.CLEAR_REGION, T.GET_RESYNC_WORK,
                T.SET_REGION_SYNC, T.GET_SYNC_COUNT, T.STATUS_INFO, T.IS_REMOTE_RECOVERING}
    assert set(requests.REREGISTERS) == expected


def test_sizes():
    assert wire.CnMsg.sizeof() == 20 and wire.UlogHeader.sizeof() == 160 and wire.NlMsgHdr.sizeof() == 16
    assert wire.MAX_REQUEST_DATA == 332
    assert wire.ResyncWork.sizeof() == wire.SetRegionSync.sizeof() == wire.RemoteRecovering.sizeof() == 16


# --- replies -------------------------------------------------------------------------------------------


def test_reply_echoes_the_request():
    req = request(seq=0xFFFFFFFF)
    out = wire.encode_reply(Reply(req, 0, wire.build_s64(1)))
    rep = wire.decode_reply(out)
    assert (rep.seq, rep.error, rep.luid, rep.uuid, rep.ack_form) == (0xFFFFFFFF, 0, LUID, UUID, False)
    cn = wire.CnMsg.parse(out)
    assert (cn.idx, cn.val, cn.len, cn.ack) == (7, 1, wire.HEADER_SIZE + 8, 0)
    hdr = wire.UlogHeader.parse(out[wire.CN_MSG_SIZE :])
    assert hdr.data_size == 8 and hdr.version == 3 and hdr.padding == b"\0\0\0"


def test_error_reply_has_no_data():
    out = wire.encode_reply(Reply(request(), -errno.EINVAL))
    assert wire.UlogHeader.parse(out[wire.CN_MSG_SIZE :]).data_size == 0
    assert len(out) == wire.CN_MSG_SIZE + wire.HEADER_SIZE


def test_positive_error_is_refused():
    with pytest.raises(ValueError):
        wire.encode_reply(Reply(request(), errno.EINVAL))


def test_ack_form():
    out = wire.encode_reply(Reply(request(seq=1234), -errno.EAGAIN, ack=True))
    assert len(out) == wire.CN_MSG_SIZE
    cn = wire.CnMsg.parse(out)
    assert (cn.idx, cn.val, cn.seq, cn.ack, cn.len, cn.flags) == (7, 1, 1234, errno.EAGAIN, 0, 0)
    rep = wire.decode_reply(out)
    assert rep.ack_form and rep.seq == 1234 and rep.error == -errno.EAGAIN and rep.data == b""


@pytest.mark.parametrize("cut", [0, 19])
def test_decode_reply_short(cut):
    with pytest.raises(FrameError):
        wire.decode_reply(wire.encode_reply(Reply(request(), 0))[:cut])


def test_decode_reply_incomplete_and_past_end():
    out = wire.encode_reply(Reply(request(), 0, wire.build_u64(3)))
    with pytest.raises(FrameError, match="incomplete"):
        wire.decode_reply(patched(out, cn={"len": 100}))
    with pytest.raises(FrameError, match="incomplete"):
        wire.decode_reply(out[: wire.CN_MSG_SIZE + 100])
    with pytest.raises(FrameError, match="past the end"):
        wire.decode_reply(out[:-1])
    with pytest.raises(FrameError, match="connector id"):
        wire.decode_reply(patched(out, cn={"val": 2}))


def test_decode_reply_ignores_cn_len_beyond_160_like_the_kernel():
    """fill_pkg takes data_size from the header and does not check cn_msg.len against it."""
    out = wire.encode_reply(Reply(request(), 0, wire.build_u64(3)))
    assert wire.decode_reply(patched(out, cn={"len": wire.HEADER_SIZE})).data == wire.build_u64(3)


# --- netlink ----------------------------------------------------------------------------------------


def test_nlmsghdr_round_trip_and_padding():
    payload = frame(type_=RequestType.CTR, data=b"32768 clustered-core 1024")
    datagram = wire.add_nlmsghdr(payload, seq=9)
    assert len(datagram) % 4 == 0 and len(datagram) == 224
    hdr = wire.NlMsgHdr.parse(datagram)
    assert (hdr.len, hdr.type, hdr.flags, hdr.seq, hdr.pid) == (16 + len(payload), wire.NLMSG_DONE, 0, 9, 0)
    assert wire.strip_nlmsghdr(datagram) == (wire.NLMSG_DONE, payload)


@pytest.mark.parametrize("nl_len", [0, 15, 10_000])
def test_strip_nlmsghdr_rejects_bad_lengths(nl_len):
    datagram = wire.add_nlmsghdr(frame())
    hdr = dict(wire.NlMsgHdr.parse(datagram))
    hdr.pop("_io", None)
    hdr["len"] = nl_len
    with pytest.raises(FrameError):
        wire.strip_nlmsghdr(wire.NlMsgHdr.build(hdr) + datagram[wire.NLMSGHDR_SIZE :])


def test_strip_nlmsghdr_short():
    with pytest.raises(FrameError):
        wire.strip_nlmsghdr(b"\0" * 15)


# --- payload parsers -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4, 7, 9, 16])
def test_parse_region_rejects_wrong_sizes(size):
    with pytest.raises(ValueError):
        wire.parse_region(b"\0" * size)


@pytest.mark.parametrize("size", [1, 7, 9, 12, 255])
def test_parse_regions_rejects_partial_regions(size):
    with pytest.raises(ValueError):
        wire.parse_regions(b"\0" * size)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 24])
def test_parse_set_region_sync_rejects_wrong_sizes(size):
    with pytest.raises(ValueError):
        wire.parse_set_region_sync(b"\0" * size)


def test_payload_round_trips():
    top = 2**64 - 1
    assert wire.parse_region(wire.build_u64(top)) == top
    assert wire.parse_regions(b"") == []
    regions = [top, 0, 31, 5]
    assert wire.parse_regions(wire.build_regions(regions)) == regions
    assert len(wire.build_regions(list(range(32)))) == 256
    assert wire.parse_set_region_sync(wire.build_set_region_sync(top, 1)) == (top, 1)
    assert wire.parse_set_region_sync(wire.build_set_region_sync(3, -1)) == (3, -1)
    assert wire.parse_s64(wire.build_s64(-1)) == -1
    assert wire.parse_u64(wire.build_u64(top)) == top
    assert wire.parse_resync_work(wire.build_resync_work(True, top)) == (1, top)
    assert wire.parse_remote_recovering(wire.build_remote_recovering(False, 32)) == (0, 32)


def test_value_sizes():
    assert len(wire.build_u64(1)) == len(wire.build_s64(1)) == 8
    assert len(wire.build_resync_work(False, 0)) == len(wire.build_remote_recovering(True, 0)) == 16


@pytest.mark.parametrize("parser,size", [
    (wire.parse_u64, 9), (wire.parse_u64, 7), (wire.parse_s64, 16), (wire.parse_s64, 0),
    (wire.parse_resync_work, 17), (wire.parse_resync_work, 15),
    (wire.parse_remote_recovering, 24), (wire.parse_remote_recovering, 8),
])
def test_reply_value_parsers_reject_wrong_sizes(parser, size):
    with pytest.raises(ValueError):
        parser(b"\0" * size)


# --- the request table -------------------------------------------------------------------------------

_FIXED = sorted({id(p): p for f in requests.REQUESTS.values() for p in (f.payloads.request, f.payloads.reply)
                 if p is not None and p.packed is not None}.values(), key=lambda p: p.what)


@pytest.mark.parametrize("payload", _FIXED, ids=[p.what for p in _FIXED])
def test_generated_struct_agrees_with_the_construct_definition(payload):
    """The fast path (the struct generated from each definition) parses and builds what
    construct itself does with the same definition, for any bytes of the right size."""
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.binary(min_size=payload.packed.size, max_size=payload.packed.size))
    def check(data):
        fields = payload.parse(data)
        parsed = payload.definition.parse(data)
        assert fields == {name: parsed[name] for name in payload.names}
        assert payload.build(fields) == payload.definition.build(fields) == data

    check()


def test_region_list_agrees_with_the_construct_definition():
    regions = [2**64 - 1, 0, 31, 5]
    data = wire.build_regions(regions)
    assert wire.RegionList.parse(data).regions == regions
    assert wire.RegionList.build({"regions": regions}) == data
    assert requests.parse_payload(RequestType.MARK_REGION, data) == {"regions": regions}


def test_flat_struct_follows_the_definition_or_refuses():
    import construct as c

    from ulog_disk.protocol.fastpath import const, flat_struct

    record = c.Struct("magic" / c.Const(b"ABCD"), "state" / c.Enum(c.Int8ul, on=1), "n" / c.Int32ul,
                      "name" / c.PascalString(c.Int8ul, "ascii"), c.Terminated)
    head = flat_struct(record, prefix=True)
    assert head.format == "<4sBL" and const(record, "magic") == b"ABCD"
    built = record.build(dict(state="on", n=7, name="x"))
    assert head.pack(b"ABCD", 1, 7) == built[: head.size]
    with pytest.raises(TypeError, match="not a fixed-size field"):
        flat_struct(record)
    with pytest.raises(TypeError, match="byte order"):
        flat_struct(c.Struct("a" / c.Int32ul, "b" / c.Int32ub))


@pytest.mark.parametrize("kind", [RequestType.MARK_REGION, RequestType.CLEAR_REGION])
def test_a_region_group_holds_at_least_one_region(kind):
    assert wire.parse_region_group(kind, wire.build_regions([3, 1])) == [3, 1]
    with pytest.raises(ValueError, match=f"{kind.name} without regions"):
        wire.parse_region_group(kind, b"")
    with pytest.raises(ValueError, match="multiple of 8"):
        wire.parse_region_group(kind, b"\0" * 12)


def test_every_type_has_a_table_entry():
    assert set(requests.REQUESTS) == set(RequestType)
    carries = {k for k, f in requests.REQUESTS.items() if f.payloads.request is not None}
    T = RequestType
    assert carries == {T.CTR, T.IS_CLEAN, T.IN_SYNC, T.FLUSH, T.MARK_REGION, T.CLEAR_REGION,
                       T.SET_REGION_SYNC, T.IS_REMOTE_RECOVERING}


def test_no_data_is_no_payload_both_ways():
    for kind in [*RequestType, 0, 18]:
        for reply in (False, True):
            assert requests.parse_payload(kind, b"", reply=reply) == {}
            assert requests.build_payload(kind, {}, reply=reply) == b""


@pytest.mark.parametrize("data,expected", [
    (b"8 core 8", ("8 core 8", False)),
    (b"8 core 8\0", ("8 core 8", True)),
])
def test_ctr_string_is_read_once(data, expected):
    assert wire.parse_ctr_string(data) == expected
    fields = {"ctr": expected[0], "nul_counted": expected[1]}
    assert requests.parse_payload(RequestType.CTR, data) == fields
    assert requests.build_payload(RequestType.CTR, fields) == data


@pytest.mark.parametrize("data,why", [
    (b"8 core\0 8", "contains a NUL byte"), (b"8 core 8\0\0", "contains a NUL byte"),
    ("8 c\u00f6re 8".encode("latin-1"), "not ASCII"),
])
def test_ctr_string_refusals_are_the_engines(data, why):
    from ulog_disk.protocol.ctrargs import CtrError, parse_ctr

    with pytest.raises(ValueError, match=why):
        requests.parse_payload(RequestType.CTR, data)
    with pytest.raises(CtrError, match=why):
        parse_ctr(data)


@pytest.mark.parametrize("kind,data", [
    (RequestType.DTR, b"x"), (RequestType.GET_RESYNC_WORK, b"\0" * 8), (18, b"\0"),
    (RequestType.IN_SYNC, b"\0" * 7), (RequestType.MARK_REGION, b"\0" * 9),
])
def test_request_payload_of_the_wrong_shape_is_refused(kind, data):
    with pytest.raises(ValueError):
        requests.parse_payload(kind, data)


def test_reply_payloads_by_name():
    T = RequestType
    assert requests.parse_payload(T.GET_REGION_SIZE, wire.build_u64(1024), reply=True) == {"u64": 1024}
    status = {"text": "1 core", "nul_counted": True}
    assert requests.parse_payload(T.STATUS_INFO, b"1 core\0", reply=True) == status
    assert requests.build_payload(T.CTR, {"device": "7:3", "nul_counted": True}, reply=True) == b"7:3\0"
    for kind, data in ((T.FLUSH, b"\0"), (T.STATUS_INFO, b"no nul"), (T.CTR, b"a\0b\0")):
        with pytest.raises(ValueError):
            requests.parse_payload(kind, data, reply=True)


# --- capture files (formats/capture.md): containers of wire frames ------------------------------------


def test_capture_round_trip(tmp_path):
    path = tmp_path / "cap"
    req = frame(type_=RequestType.CTR, data=b"32768 clustered-core 1024")
    rep = wire.encode_reply(Reply(wire.decode_frame(req), 0))
    writer = capture.CaptureWriter(str(path), "unix")
    writer.write(capture.TO_DAEMON, req)
    writer.write(capture.FROM_DAEMON, rep)
    writer.close()
    writer = capture.CaptureWriter(str(path), "netlink")  # appends, no second magic
    writer.write(capture.TO_DAEMON, req)
    writer.close()
    data = path.read_bytes()
    assert data.startswith(capture.MAGIC) and data.count(capture.MAGIC) == 1
    assert len(data) == 8 + 3 * capture.RECORD_HEADER_SIZE + 2 * len(req) + len(rep)
    records = list(capture.read_capture(data))
    assert [(r.direction, r.transport, r.frame) for r in records] == [(0, 1, req), (1, 1, rep), (0, 0, req)]
    assert wire.decode_frame(records[0].frame).data == b"32768 clustered-core 1024"
    assert wire.decode_reply(records[1].frame).seq == 77
    assert capture.RecordHeader.parse(data[8:24]).length == len(req)


def test_capture_truncated_last_record_after_complete_ones(tmp_path):
    path = tmp_path / "cap"
    writer = capture.CaptureWriter(str(path), "unix")
    writer.write(capture.TO_DAEMON, frame())
    writer.write(capture.TO_DAEMON, frame())
    writer.close()
    data = path.read_bytes()
    seen = []
    with pytest.raises(capture.CaptureFormatError):
        for record in capture.read_capture(data[:-1]):
            seen.append(record)
    assert len(seen) == 1
    with pytest.raises(capture.CaptureFormatError):
        list(capture.read_capture(b"NOTACAPT"))


def test_capture_bad_reserved_field_is_a_format_error(tmp_path):
    header = capture.RecordHeader.build(dict(time_ns=1, direction=0, transport=1, reserved=0, length=0))
    bad = capture.MAGIC + header[:10] + b"\x01\x00" + header[12:]
    with pytest.raises(capture.CaptureFormatError):
        list(capture.read_capture(bad))


# --- peek_frame: whose a frame is, from its header alone -----------------------------------------


@given(st.text(alphabet=st.characters(max_codepoint=255, blacklist_characters="\0"), max_size=128),
       st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_peek_frame_reads_what_decode_frame_reads(uuid: str, luid: int, raw_type: int, data: bytes) -> None:
    f = wire.encode_request(Request(luid=luid, uuid=uuid, version=3, seq=5,
                                    request_type=raw_type & wire.DM_ULOG_REQUEST_MASK, data=data,
                                    raw_type=raw_type))
    decoded = wire.decode_frame(f)
    assert wire.peek_frame(f) == (decoded.key, decoded.request_type)


@pytest.mark.parametrize("length", [0, wire.CN_MSG_SIZE, wire.CN_MSG_SIZE + wire.HEADER_SIZE - 1])
def test_peek_frame_of_a_frame_without_a_whole_header_is_none(length: int) -> None:
    assert wire.peek_frame(frame()[:length]) is None
