"""The cluster messages and the snapshot (``ulog_disk.cluster.messages``, formats/cluster.md):
golden vectors both ways, every kind round trip, garbage and other versions refused with
``MessageError`` and nothing else."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import construct as c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulog_disk.cluster import messages as m
from ulog_disk.cluster import shared as sh
from ulog_disk.log.regionlog import new_bitmap
from ulog_disk.testing.vectors import golden_vectors

VECTORS = Path(__file__).resolve().parent.parent / "formats" / "vectors" / "cluster"

_INPUTS = {cls.__name__: cls for cls in (sh.Flush, sh.ResyncWork, sh.SetRegionSync, sh.Open, sh.Close,
                                         sh.Departed, sh.Fenced, sh.Rebooted)}


# --- the vectors' JSON form -----------------------------------------------------------------------

def message_json(decoded: m.Decoded) -> dict:
    """A decoded message as a vector's ``fields``: lists for arrays, hex for bytes."""
    out: dict[str, object] = {"kind": decoded.kind.name}
    for name, value in decoded.fields.items():
        if name.startswith("_"):
            continue
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, list):
            value = list(value)
        out[name] = value
    return out


def message_from_json(fields: dict) -> bytes:
    kind = m.Kind[fields["kind"]]
    values = {k: bytes.fromhex(v) if k == "piece" else v for k, v in fields.items() if k != "kind"}
    return m.encode(kind, **values)


def input_json(item: sh.Input) -> dict:
    out: dict[str, object] = {"type": type(item).__name__}
    for name in item.__slots__:
        value = getattr(item, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def input_from_json(fields: dict) -> sh.Input:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k != "type"}
    return _INPUTS[fields["type"]](**values)


def snapshot_json(state: sh.ClusterState) -> dict:
    """A state as a snapshot vector's ``fields``: bitmaps as the regions whose bit is 1."""
    return m.snapshot_fields(state, bitmap=lambda bits: list(bits.search(1)), bitmap_key="regions")


def state_from_json(fields: dict) -> sh.ClusterState:
    state = sh.ClusterState(epoch=fields["epoch"], unfenced=list(fields["unfenced"]))
    for entry in fields["logs"]:
        count = entry["region_count"]

        def bits(regions: list[int], count: int = count):
            b = new_bitmap(count, False)
            for r in regions:
                b[r] = 1
            return b

        sync = bits(entry["sync"])
        state.logs[entry["uuid"]] = sh.SharedLog(
            uuid=entry["uuid"], region_count=count, sync=sync, sync_count=sync.count(1),
            marks={x["node"]: bits(x["regions"]) for x in entry["marks"]},
            held={x["node"]: bits(x["regions"]) for x in entry["held"]},
            released=bits(entry["released"]),
            recovering={x["region"]: x["node"] for x in entry["recovering"]},
            cursor={x["node"]: x["cursor"] for x in entry["cursor"]},
            opened={x["node"]: sh.NodeOpen(x["luid"], x["boot_id"]) for x in entry["opened"]},
        )
    return state


def _vectors(kind: str | None = None) -> list[tuple[str, dict]]:
    return golden_vectors(VECTORS, kind)


# --- golden vectors --------------------------------------------------------------------------------

def test_every_message_kind_has_a_vector_and_there_is_a_snapshot():
    kinds = {vec["fields"]["kind"] for _, vec in _vectors("message")}
    assert kinds == {k.name for k in m.Kind}
    assert _vectors("snapshot")


@pytest.mark.parametrize(("name", "vec"), _vectors("message"))
def test_message_vector_both_ways(name, vec):
    data = bytes.fromhex(vec["hex"])
    decoded = m.decode(data)
    assert message_json(decoded) == vec["fields"]
    assert message_from_json(vec["fields"]) == data
    # The one definition reads and writes the same bytes (FLUSH and DURABLE have a hand path).
    assert m.Message.build(m.Message.parse(data)) == data
    if decoded.kind in m.STATE_KINDS:
        assert input_json(m.as_input(vec["sender"], decoded)) == vec["input"]
        assert m.as_input(vec["sender"], decoded) == input_from_json(vec["input"])
    else:
        assert "input" not in vec
        with pytest.raises(m.MessageError):
            m.as_input(vec.get("sender", 1), decoded)


@pytest.mark.parametrize(("name", "vec"), _vectors("snapshot"))
def test_snapshot_vector_both_ways(name, vec):
    data = bytes.fromhex(vec["hex"])
    state = m.decode_snapshot(data)
    assert snapshot_json(state) == vec["fields"]
    assert state == state_from_json(vec["fields"])
    assert m.encode_snapshot(state_from_json(vec["fields"])) == data
    assert state.check() == []
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])
    assert m.digest(data) == vec["digest"] == struct.unpack_from("<I", data, len(data) - 4)[0]


def test_the_digest_tells_states_apart():
    """A HELLO's digest: states that differ in one bit have different digests (a CRC-32 over a
    whole snapshot, its own CRC included, is one constant for all)."""
    state = m.decode_snapshot(_snapshot())
    digests = {m.digest(m.encode_snapshot(state))}
    for change in (lambda s: s.logs["LVM-abc"].marks[1].__setitem__(3, 1),
                   lambda s: setattr(s, "epoch", s.epoch + 1),
                   lambda s: s.logs["LVM-abc"].cursor.__setitem__(2, 3)):
        other = m.decode_snapshot(_snapshot())
        change(other)
        digests.add(m.digest(m.encode_snapshot(other)))
    assert len(digests) == 4


def test_snapshot_vector_is_a_reachable_state():
    """The snapshot vector is the state its ``stream`` makes: a state the rules can reach."""
    for _, vec in _vectors("snapshot"):
        state = sh.ClusterState()
        for item in vec["stream"]:
            state.apply(input_from_json(item))
        assert m.encode_snapshot(state) == bytes.fromhex(vec["hex"])


def test_hello_vector_names_its_membership():
    for _, vec in _vectors("message"):
        if vec["fields"]["kind"] == "HELLO":
            members = [tuple(p) for p in vec["members"]]
            assert vec["fields"]["round"] == m.round_of(members) == m.round_of(members[::-1])


# --- every kind round trip -------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
uuids = st.text(alphabet=st.characters(max_codepoint=255), max_size=255)
boot_ids = st.text(alphabet=st.characters(max_codepoint=127), max_size=255)
region_lists = st.lists(u64, max_size=40)

BODIES: dict[m.Kind, st.SearchStrategy[dict]] = {
    m.Kind.FLUSH: st.fixed_dictionaries({"token": u64, "uuid": uuids, "marks": region_lists,
                                         "clears": region_lists}),
    m.Kind.RESYNC_WORK: st.fixed_dictionaries({"token": u64, "uuid": uuids,
                                               "prefer": st.lists(u64, max_size=20), "limit": u64}),
    m.Kind.SET_REGION_SYNC: st.fixed_dictionaries({"token": u64, "uuid": uuids, "region": u64,
                                                   "in_sync": st.booleans()}),
    m.Kind.OPEN: st.fixed_dictionaries({"token": u64, "uuid": uuids, "luid": u64, "boot_id": boot_ids,
                                        "region_count": u64, "in_sync": st.booleans()}),
    m.Kind.CLOSE: st.fixed_dictionaries({"token": u64, "uuid": uuids, "destroy": st.booleans()}),
    m.Kind.DEPARTED: st.fixed_dictionaries({"token": u64, "nodes": st.lists(u32, max_size=40)}),
    m.Kind.FENCED: st.fixed_dictionaries({"token": u64, "node": u32}),
    m.Kind.REBOOTED: st.fixed_dictionaries({"token": u64, "boot_id": boot_ids}),
    m.Kind.HELLO: st.fixed_dictionaries({"round": u32, "epoch": u64, "digest": u32, "current": st.booleans(),
                                         "boot_id": boot_ids, "left_behind": st.booleans(),
                                         "known": st.lists(u32, max_size=40)}),
    m.Kind.STATE: st.fixed_dictionaries({"round": u32, "piece": st.binary(max_size=300)}),
    m.Kind.DURABLE: st.fixed_dictionaries({"epoch": u64}),
}


def test_every_kind_has_a_strategy():
    assert set(BODIES) == set(m.Kind)


def _plain(fields: c.Container) -> dict:
    return {k: list(v) if isinstance(v, list) else v for k, v in fields.items() if not k.startswith("_")}


@settings(max_examples=300)
@given(st.sampled_from(list(m.Kind)).flatmap(lambda k: st.tuples(st.just(k), BODIES[k])))
def test_every_kind_round_trips(case):
    kind, fields = case
    data = m.encode(kind, **fields)
    assert data[:4] == b"UC" + bytes([m.MESSAGE_VERSION, kind])
    decoded = m.decode(data)
    assert decoded.kind is kind
    assert _plain(decoded.fields) == fields
    assert m.encode(kind, **_plain(decoded.fields)) == data
    assert m.Message.build({"header": {"kind": kind}, "body": fields}) == data
    if kind is not m.Kind.STATE:
        # Every strict prefix is refused: a message is never read from part of one. (A STATE's
        # piece runs to the end of the message, so a shorter one is another piece.)
        for end in range(len(data)):
            with pytest.raises(m.MessageError):
                m.decode(data[:end])


inputs = st.one_of(
    st.builds(sh.Flush, u32, uuids, st.lists(u64, max_size=20).map(tuple),
              st.lists(u64, max_size=20).map(tuple)),
    st.builds(sh.ResyncWork, u32, uuids, st.lists(u64, max_size=20).map(tuple), u64),
    st.builds(sh.SetRegionSync, u32, uuids, u64, st.booleans()),
    st.builds(sh.Open, u32, uuids, u64, boot_ids, u64, st.booleans()),
    st.builds(sh.Close, u32, uuids, st.booleans()),
    st.builds(sh.Departed, st.lists(u32, max_size=20).map(tuple)),
    st.builds(sh.Fenced, u32),
    st.builds(sh.Rebooted, u32, boot_ids),
)


def message_of(item: sh.Input, token: int) -> bytes:
    """The message a node multicasts for ``item`` (the sender is corosync's to tell)."""
    if isinstance(item, sh.Flush):
        return m.encode(m.Kind.FLUSH, token=token, uuid=item.uuid, marks=item.marks, clears=item.clears)
    if isinstance(item, sh.ResyncWork):
        return m.encode(m.Kind.RESYNC_WORK, token=token, uuid=item.uuid, prefer=list(item.prefer),
                        limit=item.limit)
    if isinstance(item, sh.SetRegionSync):
        return m.encode(m.Kind.SET_REGION_SYNC, token=token, uuid=item.uuid, region=item.region,
                        in_sync=item.in_sync)
    if isinstance(item, sh.Open):
        return m.encode(m.Kind.OPEN, token=token, uuid=item.uuid, luid=item.luid, boot_id=item.boot_id,
                        region_count=item.region_count, in_sync=item.in_sync)
    if isinstance(item, sh.Close):
        return m.encode(m.Kind.CLOSE, token=token, uuid=item.uuid, destroy=item.destroy)
    if isinstance(item, sh.Departed):
        return m.encode(m.Kind.DEPARTED, token=token, nodes=item.nodes)
    if isinstance(item, sh.Fenced):
        return m.encode(m.Kind.FENCED, token=token, node=item.node)
    return m.encode(m.Kind.REBOOTED, token=token, boot_id=item.boot_id)


@settings(max_examples=300)
@given(inputs, u64)
def test_every_state_input_survives_its_message(item, token):
    decoded = m.decode(message_of(item, token))
    assert decoded.kind in m.STATE_KINDS
    assert decoded.fields.token == token
    sender = getattr(item, "node", 77)
    assert m.as_input(sender, decoded) == item


def test_the_state_kinds_are_the_inputs():
    assert {k.name for k in m.STATE_KINDS} == {"FLUSH", "RESYNC_WORK", "SET_REGION_SYNC", "OPEN", "CLOSE",
                                               "DEPARTED", "FENCED", "REBOOTED"}


# --- refusals --------------------------------------------------------------------------------------

def _decodes_or_refuses(data: bytes) -> None:
    try:
        decoded = m.decode(data)
    except m.MessageError:
        return
    assert isinstance(decoded.kind, m.Kind)


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_garbage_is_refused_with_message_error(data):
    _decodes_or_refuses(data)


@settings(max_examples=1000)
@given(st.integers(0, 255), st.binary(max_size=80))
def test_garbage_after_a_header_is_refused_with_message_error(kind, tail):
    _decodes_or_refuses(b"UC" + bytes([m.MESSAGE_VERSION, kind]) + tail)


@pytest.mark.parametrize("kind", [k for k in range(256) if k not in set(m.Kind)])
def test_an_unknown_kind_is_refused(kind):
    with pytest.raises(m.MessageError, match="unknown kind"):
        m.decode(b"UC" + bytes([m.MESSAGE_VERSION, kind]) + bytes(16))


@pytest.mark.parametrize("version", [0, 1, 3, 255])
@pytest.mark.parametrize("kind", list(m.Kind))
def test_another_message_version_is_refused(version, kind):
    """Version 1 (before HELLO said left_behind and known) included: a daemon of another
    version is refused, one line each, never half read."""
    _, vec = next((n, v) for n, v in _vectors("message") if v["fields"]["kind"] == kind.name)
    data = bytearray.fromhex(vec["hex"])
    data[2] = version
    with pytest.raises(m.MessageError, match=f"version {m.MESSAGE_VERSION}"):
        m.decode(bytes(data))


@pytest.mark.parametrize("magic", [b"UD", b"CU", b"\0\0", b"uc"])
def test_another_magic_is_refused(magic):
    for _, vec in _vectors("message"):
        data = magic + bytes.fromhex(vec["hex"])[2:]
        with pytest.raises(m.MessageError):
            m.decode(data)


def _snapshot() -> bytes:
    return bytes.fromhex(_vectors("snapshot")[0][1]["hex"])


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_snapshot_of_another_version_is_refused():
    data = bytearray(_snapshot()[:-4])
    struct.pack_into("<H", data, 4, 2)
    with pytest.raises(m.MessageError, match=f"version {m.SNAPSHOT_VERSION}"):
        m.decode_snapshot(_recrc(bytes(data)))


@pytest.mark.parametrize("offset", [0, 6])
def test_snapshot_with_another_magic_or_reserved_bits_is_refused(offset):
    data = bytearray(_snapshot()[:-4])
    data[offset] ^= 1
    with pytest.raises(m.MessageError):
        m.decode_snapshot(_recrc(bytes(data)))


def test_every_bit_of_the_snapshot_is_covered():
    data = _snapshot()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(m.MessageError):
            m.decode_snapshot(bytes(flipped))
    for end in range(len(data)):
        with pytest.raises(m.MessageError):
            m.decode_snapshot(data[:end])


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_snapshot_garbage_is_refused_with_message_error(data):
    with pytest.raises(m.MessageError):
        m.decode_snapshot(data)


def _log(**changes) -> dict:
    log = {"uuid": "LVM-a", "region_count": 8, "sync": b"\xff", "released": b"\0", "marks": [], "held": [],
           "recovering": [], "cursor": [], "opened": []}
    log.update(changes)
    return log


def _built(*logs: dict) -> bytes:
    return m.SnapshotV1.build({"body": {"value": {"epoch": 1, "unfenced": [], "logs": list(logs)}}})


def test_a_snapshot_its_own_rules_refuse_is_refused():
    """CRC-valid, but a state no stream makes: a held region in sync."""
    with pytest.raises(m.MessageError, match="inconsistent"):
        m.decode_snapshot(_built(_log(held=[{"node": 3, "bits": b"\x01"}])))


def test_a_snapshot_recovering_past_the_end_is_refused():
    with pytest.raises(m.MessageError):
        m.decode_snapshot(_built(_log(recovering=[{"region": 100, "node": 1}])))


@pytest.mark.parametrize("sync", [b"", b"\xff\xff"])
def test_a_snapshot_bitmap_of_another_length_is_refused(sync):
    with pytest.raises(m.MessageError):
        m.decode_snapshot(_built(_log(sync=sync)))


def test_a_snapshot_naming_a_log_twice_is_refused():
    with pytest.raises(m.MessageError):
        m.decode_snapshot(_built(_log(), _log()))


def test_a_snapshot_of_an_impossible_region_count_is_refused():
    with pytest.raises(m.MessageError):
        m.decode_snapshot(_built(_log(region_count=2**62)))


@pytest.mark.parametrize("kind", [k for k in m.Kind if k is not m.Kind.STATE])
def test_bytes_after_a_message_are_refused(kind):
    """One CPG message is one cluster message: bytes past its body are a layout this version does
    not know (a change of layout is a new version, formats/cluster.md)."""
    _, vec = next((n, v) for n, v in _vectors("message") if v["fields"]["kind"] == kind.name)
    with pytest.raises(m.MessageError):
        m.decode(bytes.fromhex(vec["hex"]) + b"\0")


@pytest.mark.parametrize(("name", "vec"), [(n, v) for n, v in _vectors("message")
                                           if m.Kind[v["fields"]["kind"]] in m.STATE_KINDS])
def test_a_cluster_journal_of_version_1_is_read(name, vec):
    """The cluster journal holds state messages as they were applied: a journal written by
    version 1 is replayed, not cut at its first record. A live peer of version 1 is refused."""
    data = bytearray.fromhex(vec["hex"])
    data[2] = 1
    fields = dict(vec["fields"])
    if fields["kind"] == "RESYNC_WORK":
        data = data[:-(2 + 8 * len(fields["prefer"]) + 8)]   # version 1 had no ``prefer``, ``limit``
        fields["prefer"], fields["limit"] = [], 2**64 - 1
    decoded = m.decode_stored(bytes(data))
    assert {"kind": decoded.kind.name, **_plain(decoded.fields)} == fields
    with pytest.raises(m.MessageError, match=f"version {m.MESSAGE_VERSION}"):
        m.decode(bytes(data))
