"""The store layout (formats/store.md): golden vectors both ways, version refusal, names."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.storage import store_format as sf
from ulog_disk.testing.vectors import golden_vectors

VECTORS = Path(__file__).resolve().parent.parent / "formats" / "vectors" / "store"

_RECORDS = {
    "checkpoint": sf.CheckpointRecord,
    "meta": sf.MetaRecord,
    "retained": sf.RetainedRecord,
    "format": sf.FormatRecord,
    "journal_header": sf.JournalHeader,
}


def _vectors(kind: str | None = None) -> list[tuple[str, dict]]:
    return golden_vectors(VECTORS, kind)


def _decode(kind: str, data: bytes) -> dict:
    if kind in _RECORDS and kind != "checkpoint":
        return dataclasses.asdict(_RECORDS[kind].decode(data))
    if kind == "journal_ops":
        ops, valid, why = sf.decode_journal_ops(data)
        assert (valid, why) == (len(data), None)
        return {"ops": [list(op) for op in ops]}
    if kind == "chunk_key":
        return {"index": sf.decode_chunk_key(data)}
    if kind in ("format_v1", "format_v2"):
        return dataclasses.asdict(sf.FormatRecord.decode(data))
    if kind == "checkpoint":
        rec = sf.CheckpointRecord.decode(data)
        # The definition reads the same fields as the fast path.
        p = sf.CheckpointRecordV1.parse(data)
        assert (p.journal_id, p.position, p.version) == (rec.journal_id, rec.position, rec.version)
        return {"journal_id": rec.journal_id.hex(), "position": rec.position, "version": rec.version}
    if kind == "sealed_value":
        raise AssertionError("sealed values are checked by test_sealed_value_vector_both_ways")
    raise AssertionError(kind)


def _encode(kind: str, fields: dict) -> bytes:
    if kind in _RECORDS and kind != "checkpoint":
        return _RECORDS[kind](**fields).encode()
    if kind == "journal_ops":
        return sf.encode_journal_ops(tuple(op) for op in fields["ops"])
    if kind == "chunk_key":
        return sf.encode_chunk_key(fields["index"])
    if kind in ("format_v1", "format_v2"):
        # Never written by the package (FormatRecord.encode refuses): built from its definition.
        layout = sf.FormatRecordV1 if kind == "format_v1" else sf.FormatRecordV2
        return layout.build({k: v for k, v in fields.items() if k != "version"})
    if kind == "checkpoint":
        journal_id = bytes.fromhex(fields["journal_id"])
        built = sf.CheckpointRecordV1.build(dict(journal_id=journal_id, position=fields["position"]))
        assert sf.CheckpointRecord(journal_id, fields["position"]).encode() == built
        return built
    raise AssertionError(kind)


def test_every_kind_has_a_vector():
    kinds = {vec["kind"] for _, vec in _vectors()}
    assert kinds >= {"meta", "retained", "format", "format_v1", "format_v2", "checkpoint", "journal_header",
                     "journal_ops", "chunk_key", "sealed_value", "dir_name"}


_BYTES_BOTH_WAYS = [v for v in _vectors() if v[1]["kind"] not in ("dir_name", "sealed_value")]


@pytest.mark.parametrize(("name", "vec"), _BYTES_BOTH_WAYS)
def test_golden_vector_decodes_to_its_fields(name, vec):
    assert _decode(vec["kind"], bytes.fromhex(vec["hex"])) == vec["fields"], name


@pytest.mark.parametrize(("name", "vec"), _BYTES_BOTH_WAYS)
def test_golden_vector_fields_encode_to_its_bytes(name, vec):
    assert _encode(vec["kind"], vec["fields"]).hex() == vec["hex"], name


@pytest.mark.parametrize(("name", "vec"), _vectors("sealed_value"))
def test_sealed_value_vector_both_ways(name, vec):
    f = vec["fields"]
    db_name, key, data = f["db_name"].encode(), bytes.fromhex(f["key"]), bytes.fromhex(f["data"])
    value = bytes.fromhex(vec["hex"])
    assert sf.seal(db_name, key, data) == value
    assert sf.unseal(db_name, key, value) == data
    # The checksum is zlib's CRC-32 of name, key and bytes, little-endian after the bytes.
    assert value[-4:] == zlib.crc32(db_name + key + data).to_bytes(4, "little")
    for other_name, other_key in ((db_name + b"x", key), (db_name, key + b"x")):
        with pytest.raises(sf.StoreFormatError, match="fails its checksum"):
            sf.unseal(other_name, other_key, value)


def test_sealed_format_and_record_values_read_back():
    vecs = dict(_vectors("sealed_value"))
    fmt = sf.read_format_value(bytes.fromhex(vecs["value-format"]["hex"]))
    assert dataclasses.asdict(fmt) == dict(_vectors("format"))["format"]["fields"]
    meta_name = vecs["value-meta"]["fields"]["db_name"].encode()
    meta = sf.MetaRecord.decode(sf.record_bytes(meta_name, bytes.fromhex(vecs["value-meta"]["hex"])))
    assert dataclasses.asdict(meta) == dict(_vectors("meta"))["meta-live"]["fields"]
    assert sf.record_value(meta_name, meta.encode()).hex() == vecs["value-meta"]["hex"]
    # A layout-1 format value is the bare record: read, with nothing to verify.
    assert sf.read_format_value(bytes.fromhex(dict(_vectors("format_v1"))["format-v1"]["hex"])).version == 1
    # Layout 3: each instance's checkpoint record, sealed under its meta sub-database.
    ck = vecs["value-checkpoint"]
    name = ck["fields"]["db_name"].encode()
    rec = sf.read_checkpoint_value(name, bytes.fromhex(ck["hex"]))
    fields = dict(_vectors("checkpoint"))["checkpoint"]["fields"]
    assert rec == sf.CheckpointRecord(bytes.fromhex(fields["journal_id"]), fields["position"])
    assert sf.checkpoint_value(name, rec).hex() == ck["hex"]


@given(st.binary(min_size=1, max_size=64), st.integers(0, 2**32 - 1), st.binary(max_size=300),
       st.integers(0, 10**6))
def test_any_single_bit_flip_of_a_sealed_chunk_is_caught(name, index, bits, where):
    key = sf.encode_chunk_key(index)
    value = bytearray(sf.seal(name, key, bits))
    bit = where % (len(value) * 8)
    value[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(sf.StoreFormatError):
        sf.unseal_chunk(name, key, bytes(value))


def test_layout_1_chunks_are_read_unverified_and_the_v1_v2_format_records_are_never_written():
    key = sf.encode_chunk_key(0)
    assert sf.unseal_chunk(b"clean.0000000000000001", key, b"\x01\x02", sealed=False) == b"\x01\x02"
    old = sf.FormatRecord.decode(bytes.fromhex(dict(_vectors("format_v1"))["format-v1"]["hex"]))
    assert (old.version, old.sealed) == (1, False)
    with pytest.raises(sf.StoreFormatError, match="never written"):
        old.encode()
    v2 = sf.FormatRecord.decode(bytes.fromhex(dict(_vectors("format_v2"))["format-v2"]["hex"]))
    assert (v2.version, v2.sealed) == (2, True)
    with pytest.raises(sf.StoreFormatError, match="never written"):
        v2.encode()


@pytest.mark.parametrize(("name", "vec"), _vectors("dir_name"))
def test_golden_dir_names_both_ways(name, vec):
    assert sf.encode_dir_name(vec["fields"]["uuid"]) == vec["name"]
    assert sf.decode_dir_name(vec["name"]) == vec["fields"]["uuid"]


def test_meta_vector_offsets_match_the_documented_layout():
    """formats/store.md gives fixed offsets; check a few against the golden meta record."""
    vec = dict(_vectors("meta"))["meta-live"]
    data = bytes.fromhex(vec["hex"])
    f = vec["fields"]
    assert data[0:4] == b"ULGM"
    assert int.from_bytes(data[4:6], "little") == 1
    assert int.from_bytes(data[6:8], "little") == 1  # resumed flag
    assert int.from_bytes(data[8:16], "little") == f["luid"]
    assert int.from_bytes(data[24:32], "little") == f["region_count"]
    assert int.from_bytes(data[48:56], "little") == f["commit_seq"]
    assert data[64] == 2  # live
    assert data[72] == len(f["uuid"])
    assert data[73 : 73 + len(f["uuid"])] == f["uuid"].encode("latin-1")


# --- versions and damage ---------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "newer", "message"), [
    ("meta", 2, "version 2; .*only version 1:"),
    ("retained", 2, "version 2; .*only version 1:"),
    ("journal_header", 2, "version 2; .*only version 1:"),
    ("format", 4, "version 4; .*only version 1 and 2 and 3:"),
    ("checkpoint", 2, "version 2; .*only version 1:"),
])
def test_unknown_version_is_refused_clearly(kind, newer, message):
    _, vec = _vectors(kind)[0]
    data = bytearray.fromhex(vec["hex"])
    data[4:6] = newer.to_bytes(2, "little")
    with pytest.raises(sf.UnknownVersionError, match=message):
        _RECORDS[kind].decode(bytes(data))


@pytest.mark.parametrize("kind", ["meta", "retained", "format", "checkpoint"])
def test_damaged_records_are_refused(kind):
    _, vec = _vectors(kind)[0]
    data = bytes.fromhex(vec["hex"])
    with pytest.raises(sf.StoreFormatError):
        _RECORDS[kind].decode(b"XXXX" + data[4:])  # wrong magic
    with pytest.raises(sf.StoreFormatError):
        _RECORDS[kind].decode(data + b"\0")  # trailing bytes
    with pytest.raises(sf.StoreFormatError):
        _RECORDS[kind].decode(data[:-1])  # cut short
    with pytest.raises(sf.StoreFormatError):
        _RECORDS[kind].decode(b"UL")


def test_meta_refuses_unknown_state_flags_and_absurd_geometry():
    _, vec = _vectors("meta")[0]
    data = bytes.fromhex(vec["hex"])
    bad_state = data[:64] + b"\x09" + data[65:]
    with pytest.raises(sf.StoreFormatError, match="state"):
        sf.MetaRecord.decode(bad_state)
    bad_flags = data[:6] + b"\x05\x00" + data[8:]
    with pytest.raises(sf.StoreFormatError, match="flags"):
        sf.MetaRecord.decode(bad_flags)
    huge = data[:24] + (sf.MAX_REGION_COUNT + 1).to_bytes(8, "little") + data[32:]
    with pytest.raises(sf.StoreFormatError, match="region count"):
        sf.MetaRecord.decode(huge)


def test_journal_ops_stop_at_a_partial_or_invalid_record():
    good = sf.encode_journal_ops([(1, 7), (2, 7)])
    ops, valid, why = sf.decode_journal_ops(good + b"\x01\x00")
    assert (ops, valid) == ([(1, 7), (2, 7)], 32) and "partial" in why
    ops, valid, why = sf.decode_journal_ops(good + bytes(16) + sf.encode_journal_ops([(1, 9)]))
    assert (ops, valid) == ([(1, 7), (2, 7)], 32) and "op 0" in why
    ops, valid, why = sf.decode_journal_ops(good[:16] + b"\x01\x01" + bytes(14))
    assert (ops, valid) == ([(1, 7)], 16) and why


def test_chunks_split_and_assemble():
    cb = 16
    region_count = 16 * 8 * 2 + 5  # two whole chunks and one byte
    bitmap = bytes(range(33))
    chunks = sf.split_chunks(bitmap, region_count, cb)
    assert [len(v) for v in chunks.values()] == [16, 16, 1]
    assert sf.assemble_chunks(chunks, region_count, cb) == bitmap
    # Missing chunks read as zeros: dirty and out of sync, the safe direction.
    assert sf.assemble_chunks({1: chunks[1]}, region_count, cb) == bytes(16) + bitmap[16:32] + b"\0"
    with pytest.raises(sf.StoreFormatError, match="past"):
        sf.assemble_chunks({3: b"\0"}, region_count, cb)
    with pytest.raises(sf.StoreFormatError, match="holds 16 bytes, 1 expected"):
        sf.assemble_chunks({2: bytes(16)}, region_count, cb)
    with pytest.raises(sf.StoreFormatError):
        sf.decode_chunk_key(b"\0\0\0")


def test_chunk_keys_sort_in_index_order():
    keys = [sf.encode_chunk_key(i) for i in (0, 1, 255, 256, 65536, 2**32 - 1)]
    assert keys == sorted(keys)


def test_instance_db_names():
    assert sf.instance_db_name("meta", 0xFFFF88812A4BC000) == b"meta.ffff88812a4bc000"
    assert sf.parse_instance_db_name(b"clean.0000000000000001") == ("clean", 1)
    for bad in (b"meta.1", b"meta.FFFF88812A4BC000", b"retained.meta", b"format", b"sync.00000000000000010"):
        assert sf.parse_instance_db_name(bad) is None
    assert sf.journal_file_name(1) == "journal.0000000000000001"


# --- directory names ---------------------------------------------------------------------------


def test_ordinary_uuids_stay_readable():
    uuid = "LVM-" + "a1B2" * 16
    assert sf.encode_dir_name(uuid) == "u." + uuid
    assert sf.encode_dir_name("mpath-3600508b400105e210000900000490000").startswith("u.mpath-")


@pytest.mark.parametrize("uuid", [
    ".", "..", "a/b", "a b", "a.b", "\x00", "\xff" * 128, "x" * 128, "\x01\x7f\x80",
])
def test_awkward_uuids_round_trip(uuid):
    name = sf.encode_dir_name(uuid)
    assert "/" not in name and name not in (".", "..") and "\0" not in name
    assert sf.decode_dir_name(name) == uuid


@pytest.mark.parametrize("name", [
    "lock", ".", "..", "u.", "x.", "u.a.b", "u.LVM-abc.damaged-1767225600", "x.MFRGG",  # 'abc' is plain
    "x.mfrgg", "x.MFRGG===", "x.1", "u.a b", "u." + "a" * 129, "x.MFRGGZ",  # not canonical base32
    "x.NV4SA3LJOJZG64RPFYXC6AH7.damaged-1",
])
def test_other_names_are_not_environments(name):
    assert sf.decode_dir_name(name) is None


def test_bad_uuids_are_refused():
    for bad in ("", "a" * 129, "\u0100"):
        with pytest.raises(ValueError):
            sf.encode_dir_name(bad)


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), min_size=1, max_size=128))
def test_dir_name_round_trip_property(uuid):
    name = sf.encode_dir_name(uuid)
    assert "/" not in name and "\0" not in name
    assert name not in (".", "..")
    assert len(name.encode("utf-8")) <= 255
    # The name is pure ASCII: its byte length is what the filesystem sees, whatever the locale.
    assert name.isascii()
    assert sf.decode_dir_name(name) == uuid
    damaged = sf.damaged_dir_name(name, 2**32, 999)
    assert len(damaged.encode()) <= 255 and sf.decode_dir_name(damaged) is None


_META_FIELDS = dict(uuid="u", luid=1, ctr="8 core 8", log_type="core", region_size=8, region_count=1,
                    state="live", generation=0, cursor=0, boot_id="b", resumed=False, committed_at=0.0,
                    commit_seq=0)


@given(uuid=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), min_size=1, max_size=128),
       luid=st.integers(0, 2**64 - 1), region_count=st.integers(1, sf.MAX_REGION_COUNT),
       generation=st.integers(0, 2**64 - 1), commit_seq=st.integers(0, 2**64 - 1),
       committed_at=st.floats(allow_nan=False), state=st.sampled_from(sorted(sf.STATES)),
       ctr=st.text(max_size=400), boot_id=st.text(max_size=40), resumed=st.booleans(),
       superseded=st.booleans())
def test_meta_fast_encoding_is_the_construct_definitions(**fields):
    """The commit path packs meta records with struct; the bytes are MetaRecordV1's, and decode."""
    rec = sf.MetaRecord(**{**_META_FIELDS, **fields})
    flags = (sf.FLAG_RESUMED if rec.resumed else 0) | (sf.FLAG_SUPERSEDED if rec.superseded else 0)
    by_definition = sf.MetaRecordV1.build(dict(
        flags=flags, luid=rec.luid, region_size=rec.region_size, region_count=rec.region_count,
        generation=rec.generation, cursor=rec.cursor, commit_seq=rec.commit_seq,
        committed_at=rec.committed_at, state=rec.state, uuid=rec.uuid, log_type=rec.log_type,
        boot_id=rec.boot_id, ctr=rec.ctr))
    assert rec.encode() == by_definition
    assert sf.MetaRecord.decode(by_definition) == rec


@pytest.mark.parametrize("bad", [dict(uuid="x" * 256), dict(ctr="c" * 70000), dict(luid=-1),
                                 dict(uuid="\u20ac"), dict(generation=2**64)])
def test_meta_fields_that_do_not_fit_are_refused(bad):
    with pytest.raises(sf.StoreFormatError, match="cannot encode meta record"):
        sf.MetaRecord(**{**_META_FIELDS, **bad}).encode()


def _by_construct(layout, data: bytes) -> dict | None:
    """The fields construct decodes from ``data``, or None when it refuses it."""
    try:
        p = sf._parse(layout, data, "record")
    except sf.StoreFormatError:
        return None
    return {k: (str(v) if k == "state" else v) for k, v in p.items() if not k.startswith("_")}


@given(fields=st.fixed_dictionaries(dict(
    uuid=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), min_size=1, max_size=40),
    luid=st.integers(0, 2**64 - 1), region_count=st.integers(1, sf.MAX_REGION_COUNT),
    state=st.sampled_from(sorted(sf.STATES)), ctr=st.text(max_size=60), boot_id=st.text(max_size=20),
    resumed=st.booleans(), committed_at=st.floats(allow_nan=False))),
    cut=st.integers(0, 400), at=st.integers(0, 400), byte=st.integers(0, 255))
def test_meta_fast_decoding_is_the_construct_definitions(fields, cut, at, byte):
    """A restart decodes meta records with struct: for a record and for any byte changed or any
    cut, it gives construct's fields or leaves the record to construct (which says what is wrong)."""
    good = sf.MetaRecord(**{**_META_FIELDS, **fields}).encode()
    for data in (good, good[:cut], good[:at] + bytes([byte]) + good[at + 1:], good + b"\0"):
        fast = sf._decode_meta_fast(data)
        slow = _by_construct(sf.MetaRecordV1, data)
        if fast is not None:
            assert slow is not None
            assert vars(fast) == {k: v for k, v in slow.items() if k not in ("magic", "reserved")}
        elif data == good:
            raise AssertionError("a valid record left to construct")


@given(uuid=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), min_size=0, max_size=255),
       chunk_bytes=st.integers(0, 2**32 - 1), created_at=st.floats(allow_nan=False),
       version=st.sampled_from(sorted(sf._FORMAT_RECORDS)), cut=st.integers(0, 300), at=st.integers(0, 300),
       byte=st.integers(0, 255))
def test_format_fast_decoding_is_the_construct_definitions(uuid, chunk_bytes, created_at, version, cut, at,
                                                           byte):
    """A restart decodes format records with struct: for a record of any layout and for any byte
    changed or any cut, it gives construct's fields or leaves the record to construct."""
    good = sf._FORMAT_RECORDS[version].build(dict(chunk_bytes=chunk_bytes, uuid=uuid, created_at=created_at))
    for data in (good, good[:cut], good[:at] + bytes([byte]) + good[at + 1:], good + b"\0"):
        fast = sf._decode_format_fast(data)
        if fast is not None:
            # The version read says which layout's definition reads the bytes.
            slow = sf._FORMAT_RECORDS[fast.version].parse(data)
            want = {k: v for k, v in slow.items() if not k.startswith(("_", "reserved")) and k != "magic"}
            # repr: a changed byte may make created_at a NaN
            assert repr(sorted(vars(fast).items())) == repr(sorted(want.items()))
        elif data == good:
            raise AssertionError("a valid record left to construct")


@given(journal_id=st.binary(min_size=16, max_size=16), position=st.integers(0, 2**64 - 1),
       at=st.integers(0, 31), byte=st.integers(0, 255), cut=st.integers(0, 32))
def test_checkpoint_fast_decoding_is_the_construct_definitions(journal_id, position, at, byte, cut):
    good = sf.CheckpointRecord(journal_id, position).encode()
    for data in (good, good[:at] + bytes([byte]) + good[at + 1:], good[:cut]):
        slow = _by_construct(sf.CheckpointRecordV1, data)
        if slow is None:
            with pytest.raises(sf.StoreFormatError):
                sf.CheckpointRecord.decode(data)
        else:
            want = sf.CheckpointRecord(slow["journal_id"], slow["position"])
            assert sf.CheckpointRecord.decode(data) == want


@given(index=st.integers(0, 2**32 - 1))
def test_chunk_keys_are_the_construct_definitions(index):
    key = sf.encode_chunk_key(index)
    assert key == sf.ChunkKey.build(index) and sf.decode_chunk_key(key) == index


def test_a_moved_aside_name_reads_back():
    name = sf.encode_dir_name("LVM-a b")
    assert sf.parse_damaged_dir_name(sf.damaged_dir_name(name, 1700000000, 2)) == ("LVM-a b", 1700000000)
    assert sf.parse_damaged_dir_name(name + ".damaged-x") == ("LVM-a b", None)
    assert sf.parse_damaged_dir_name("junk.damaged-12") == (None, 12)
    assert sf.parse_damaged_dir_name(name) is None
