"""Golden wire vectors (formats/vectors/wire/*.json): decode and re-encode, byte for byte.

Each vector is checked both ways with the package's own definitions (``ulog_disk.protocol.wire``):

* decode: the committed ``hex`` decodes to the committed ``fields``;
* encode: the committed ``fields`` encode to the committed ``hex``, with payloads rebuilt from their
  decoded form (``payload``), not from the raw data bytes.

Payloads go both ways through the request table (``requests.REQUESTS``), the one the engine's fast
path and ``ulog-dump wire`` are generated from.

Then the fixed conversation (request vectors with ``engine_step``) is replayed through the engine
and every reply vector (``in_reply_to``) is compared byte for byte with what the engine answers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ulog_disk.daemon.applier import Applier
from ulog_disk.protocol import requests, wire
from ulog_disk.protocol.wire import Reply, Request, RequestType
from ulog_disk.storage.base import BackendError, Commit
from ulog_disk.storage.memory import MemoryBackend

ROOT = Path(__file__).resolve().parent.parent
VECTOR_DIR = ROOT / "formats" / "vectors" / "wire"
FAIL_UUID = "fail-commit-test"
T = RequestType


def load_vectors() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(VECTOR_DIR.glob("*.json"))]


VECTORS = load_vectors()
BY_NAME = {v["name"]: v for v in VECTORS}
REQUESTS = [v for v in VECTORS if v["direction"] == "request"]
REPLIES = [v for v in VECTORS if v["direction"] == "reply"]


def ids(vectors: list[dict]) -> list[str]:
    return [v["name"] for v in vectors]


# --- decoding into fields -------------------------------------------------------------------------


def cn_fields(frame: bytes) -> dict:
    cn = wire.CnMsg.parse(frame[: wire.CN_MSG_SIZE])
    return {"idx": cn.idx, "val": cn.val, "seq": cn.seq, "ack": cn.ack, "len": cn.len, "flags": cn.flags}


def type_name(raw: int) -> str | None:
    kind = raw & wire.DM_ULOG_REQUEST_MASK
    return T(kind).name if kind in T._value2member_map_ else None


def decode_request_fields(frame: bytes) -> dict:
    req = wire.decode_frame(frame)
    return {
        "cn_msg": cn_fields(frame),
        "header": {
            "luid": req.luid, "uuid": req.uuid, "padding": req.padding.hex(), "version": req.version,
            "error": req.error, "seq": req.seq, "request_type": req.raw_type, "type": req.request_type,
            "type_name": type_name(req.raw_type), "data_size": len(req.data),
        },
        "data": req.data.hex(),
        "payload": requests.parse_payload(req.request_type, req.data),
    }


def decode_reply_fields(frame: bytes) -> dict:
    rep = wire.decode_reply(frame)
    if rep.ack_form:
        return {"ack_form": True, "cn_msg": cn_fields(frame), "error": rep.error}
    hdr = wire.UlogHeader.parse(frame[wire.CN_MSG_SIZE : wire.CN_MSG_SIZE + wire.HEADER_SIZE])
    assert hdr.luid == rep.luid and hdr.seq == rep.seq and hdr.error == rep.error
    assert hdr.request_type & wire.DM_ULOG_REQUEST_MASK == rep.request_type
    return {
        "ack_form": False,
        "cn_msg": cn_fields(frame),
        "header": {
            "luid": rep.luid, "uuid": rep.uuid, "padding": hdr.padding.hex(), "version": hdr.version,
            "error": rep.error, "seq": rep.seq, "request_type": hdr.request_type, "type": rep.request_type,
            "type_name": type_name(hdr.request_type), "data_size": hdr.data_size,
        },
        "data": rep.data.hex(),
        "payload": requests.parse_payload(rep.request_type, rep.data, reply=True),
    }


# --- encoding from fields -------------------------------------------------------------------------


def request_from_fields(fields: dict) -> Request:
    hdr = fields["header"]
    data = requests.build_payload(hdr["type"], fields["payload"])
    assert data.hex() == fields["data"], "payload fields do not rebuild the data bytes"
    return Request(
        luid=hdr["luid"], uuid=hdr["uuid"], version=hdr["version"], seq=hdr["seq"],
        request_type=hdr["type"], raw_type=hdr["request_type"], data=data,
        cn_seq=fields["cn_msg"]["seq"], padding=bytes.fromhex(hdr["padding"]), error=hdr["error"],
    )


def reply_from_fields(fields: dict) -> Reply:
    if fields["ack_form"]:
        request = Request(luid=0, uuid="", version=wire.DM_ULOG_REQUEST_VERSION, seq=fields["cn_msg"]["seq"],
                          request_type=0, data=b"")
        return Reply(request, fields["error"], b"", ack=True)
    hdr = fields["header"]
    data = requests.build_payload(hdr["type"], fields["payload"], reply=True)
    assert data.hex() == fields["data"], "payload fields do not rebuild the data bytes"
    request = Request(luid=hdr["luid"], uuid=hdr["uuid"], version=hdr["version"], seq=hdr["seq"],
                      request_type=hdr["type"], raw_type=hdr["request_type"], data=b"")
    return Reply(request, hdr["error"], data)


# --- the vectors themselves -------------------------------------------------------------------------


def test_vector_files_are_well_formed():
    assert VECTORS, "no vectors found"
    for path in sorted(VECTOR_DIR.glob("*.json")):
        vec = json.loads(path.read_text())
        assert path.stem == vec["name"]
        assert {"name", "direction", "hex", "fields", "note"} <= vec.keys()
        assert vec["direction"] in ("request", "reply")
        assert vec["note"]
        bytes.fromhex(vec["hex"])
        if vec["direction"] == "reply":
            assert vec["in_reply_to"] in BY_NAME and BY_NAME[vec["in_reply_to"]]["direction"] == "request"


def test_every_request_type_has_a_vector():
    synthetic = {v["fields"]["header"]["type"] for v in REQUESTS if not v["name"].startswith("real-")}
    assert {int(t) for t in T} <= synthetic
    assert {0, 18} <= synthetic  # the hostile types too


def test_every_reply_shape_has_a_vector():
    shapes = set()
    for v in REPLIES:
        f = v["fields"]
        if f["ack_form"]:
            shapes.add(("ack", f["error"]))
            continue
        hdr, payload = f["header"], f["payload"]
        if hdr["error"]:
            shapes.add(("error", hdr["error"]))
        elif not payload:
            shapes.add(("empty", hdr["type_name"]))
        else:
            shapes.add((hdr["type_name"], tuple(sorted(payload))))
    expected = {
        ("ack", -11), ("error", -3), ("error", -22), ("error", -5),
        ("GET_REGION_SIZE", ("u64",)), ("GET_SYNC_COUNT", ("u64",)),
        ("IN_SYNC", ("s64",)), ("IS_CLEAN", ("s64",)),
        ("GET_RESYNC_WORK", ("have_work", "region")),
        ("IS_REMOTE_RECOVERING", ("in_sync_hint", "is_recovering")),
        ("STATUS_INFO", ("nul_counted", "text")), ("STATUS_TABLE", ("nul_counted", "text")),
        ("CTR", ("device", "nul_counted")),
        ("empty", "CTR"), ("empty", "DTR"), ("empty", "PRESUSPEND"), ("empty", "POSTSUSPEND"),
        ("empty", "RESUME"), ("empty", "FLUSH"), ("empty", "MARK_REGION"), ("empty", "CLEAR_REGION"),
        ("empty", "SET_REGION_SYNC"),
    }
    assert expected <= shapes, expected - shapes


def test_ctr_forms_are_covered():
    ctrs = [v["fields"] for v in REQUESTS if v["fields"]["header"]["type_name"] == "CTR"]
    assert any(not f["payload"]["nul_counted"] for f in ctrs)
    assert any(f["payload"]["nul_counted"] for f in ctrs)
    assert any(f["payload"]["ctr"].split()[1].endswith("disk") for f in ctrs)
    first = BY_NAME["ctr-initial-core"]["fields"]
    assert first["header"]["luid"] == 0xFFFF8D8142769400
    assert first["payload"]["ctr"] == "32768 clustered-core 1024"
    assert first["header"]["data_size"] == 25 and first["cn_msg"]["len"] == 185
    assert first["header"]["seq"] == 0 and first["header"]["version"] == 3


def test_integrated_flush_and_groups_are_covered():
    flushes = [v for v in REQUESTS if v["fields"]["header"]["type_name"] == "FLUSH"]
    assert any(v["fields"]["payload"].get("regions") for v in flushes)
    assert any(not v["fields"]["payload"] for v in flushes)
    groups = [len(v["fields"]["payload"].get("regions", [])) for v in REQUESTS]
    assert max(groups) == wire.MAX_REGIONS_PER_GROUP


@pytest.mark.parametrize("vec", VECTORS, ids=ids(VECTORS))
def test_vector_decodes_to_its_fields(vec):
    decode = decode_request_fields if vec["direction"] == "request" else decode_reply_fields
    assert decode(bytes.fromhex(vec["hex"])) == vec["fields"]


@pytest.mark.parametrize("vec", VECTORS, ids=ids(VECTORS))
def test_vector_encodes_from_its_fields(vec):
    if vec["direction"] == "request":
        frame = wire.encode_request(request_from_fields(vec["fields"]))
    else:
        frame = wire.encode_reply(reply_from_fields(vec["fields"]))
    assert frame.hex() == vec["hex"]


@pytest.mark.parametrize("vec", REPLIES, ids=ids(REPLIES))
def test_reply_vector_fits_the_kernel_buffer(vec):
    """data_size never exceeds what the waiting kernel caller offers (protocol ref §3.1)."""
    f = vec["fields"]
    if f["ack_form"]:
        assert f["cn_msg"]["len"] == 0 and f["error"] < 0
        return
    request = BY_NAME[vec["in_reply_to"]]["fields"]
    kind, size = f["header"]["type"], f["header"]["data_size"]
    assert f["header"]["seq"] == request["header"]["seq"]
    assert f["cn_msg"]["len"] == wire.HEADER_SIZE + size
    assert f["header"]["error"] <= 0
    if f["header"]["error"]:
        assert size == 0
        return
    fixed = {T.GET_REGION_SIZE: 8, T.IS_CLEAN: 8, T.IN_SYNC: 8, T.GET_SYNC_COUNT: 8,
             T.GET_RESYNC_WORK: 16, T.IS_REMOTE_RECOVERING: 16}
    if kind in fixed:
        assert size == fixed[kind]
    elif kind == T.CTR:
        assert size <= (0 if request["payload"]["nul_counted"] else 128)
    elif kind in (T.STATUS_INFO, T.STATUS_TABLE):
        assert size > 0
    else:
        assert size == 0


REAL = [v for v in REQUESTS if "netlink" in v]


@pytest.mark.parametrize("vec", REAL, ids=ids(REAL))
def test_real_kernel_netlink_datagram(vec):
    datagram = bytes.fromhex(vec["netlink"]["hex"])
    nl = vec["netlink"]["nlmsghdr"]
    assert wire.strip_nlmsghdr(datagram) == (wire.NLMSG_DONE, bytes.fromhex(vec["hex"]))
    assert nl["len"] == wire.NLMSGHDR_SIZE + len(bytes.fromhex(vec["hex"]))
    assert wire.add_nlmsghdr(bytes.fromhex(vec["hex"]), seq=nl["seq"], pid=nl["pid"]) == datagram
    # One global counter: nlmsg_seq == cn_msg.seq == dm_ulog_request.seq.
    assert nl["seq"] == vec["fields"]["cn_msg"]["seq"] == vec["fields"]["header"]["seq"]


def test_generator_reproduces_the_committed_vectors(tmp_path, monkeypatch):
    path = ROOT / "tools" / "make_wire_vectors.py"
    spec = importlib.util.spec_from_file_location("make_wire_vectors", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--capture", str(tmp_path / "no-capture")]) == 0
    made = sorted(p.name for p in tmp_path.glob("*.json"))
    committed = sorted(p.name for p in VECTOR_DIR.glob("*.json") if not p.name.startswith("real-"))
    assert made == committed
    for name in made:
        assert (tmp_path / name).read_text() == (VECTOR_DIR / name).read_text(), name


# --- the conversation through the engine ---------------------------------------------------------------


class FailingCommits(MemoryBackend):
    """Memory backend whose commits fail for one uuid (the -EIO and health-F vectors)."""

    def commit(self, commit: Commit) -> None:
        if commit.record.uuid == FAIL_UUID:
            raise BackendError(5, "injected commit failure")


def test_engine_answers_the_conversation_byte_for_byte(tmp_path):
    engine = Applier.over(FailingCommits(tmp_path), boot_id="x")
    steps = sorted((v for v in REQUESTS if "engine_step" in v), key=lambda v: v["engine_step"])
    assert [v["engine_step"] for v in steps] == list(range(len(steps)))
    expected = {v["in_reply_to"]: v for v in REPLIES}
    assert set(expected) <= {v["name"] for v in steps}
    mismatches = []
    for vec in steps:
        out = wire.encode_reply(engine.handle_now(wire.decode_frame(bytes.fromhex(vec["hex"]))))
        if vec["name"] in expected:
            want = expected[vec["name"]]
            if out.hex() != want["hex"]:
                mismatches.append(f"{vec['name']}: expected {want['name']} {decode_reply_fields(out)}")
        elif wire.decode_reply(out).error != 0:
            mismatches.append(f"{vec['name']}: unexpected error {wire.decode_reply(out).error}")
    assert not mismatches, "\n".join(mismatches)
