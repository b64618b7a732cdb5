"""The kernel's disk log format (formats/disklog.md): golden vectors both ways, the kernel's rules,
and ``ulog-dump disklog``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bitarray import bitarray
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.storage import disklog
from ulog_disk.testing.tools import ulog_dump
from ulog_disk.testing.vectors import golden_vectors
from ulog_disk.tools.common import parse_ranges, ranges

VECTORS = Path(__file__).resolve().parent.parent / "formats" / "vectors" / "disklog"


def _vectors() -> list[tuple[str, dict]]:
    return golden_vectors(VECTORS)


def _bits(count: int, not_clean: str) -> bitarray:
    b = bitarray(count, endian="little")
    b.setall(1)
    for r in parse_ranges(not_clean) if not_clean else []:
        b[r] = 0
    return b


def test_vectors_cover_every_verdict() -> None:
    kinds = {v["decode"]["verdict"] for _, v in _vectors()}
    assert kinds >= {"valid", "lvm-fresh", "bad-magic", "bad-version", "too-small"}


@pytest.mark.parametrize(("name", "vec"), _vectors())
def test_vector_decodes_to_its_fields(name: str, vec: dict) -> None:
    data = bytes.fromhex(vec["hex"])
    assert len(data) == vec["size"]
    info = disklog.inspect(data, region_count=vec["read_regions"])
    got = {"verdict": info.kind, "magic": info.magic, "version": info.version, "nr_regions": info.nr_regions,
           "region_count": info.region_count,
           "clean_ranges": None if info.clean is None else ranges(info.clean.search(1)),
           "not_clean_ranges": None if info.clean is None else ranges(info.clean.search(0))}
    assert got == vec["decode"], name


@pytest.mark.parametrize(("name", "vec"), [v for v in _vectors() if "encode" in v[1]])
def test_vector_fields_encode_to_its_bytes(name: str, vec: dict) -> None:
    enc = vec["encode"]
    bits = _bits(enc["region_count"], enc["not_clean_ranges"])
    assert disklog.encode(enc["region_count"], bits).hex() == vec["hex"]


def test_layout_matches_the_kernel_reference() -> None:
    """Offsets from dm-ulog-protocol.md §6, checked on the bytes, not through the module."""
    data = bytes.fromhex(dict(_vectors())["regions-40"]["hex"])
    assert data[0:4] == bytes.fromhex("7252694d")            # magic 0x4D695272, little-endian
    assert data[4:8] == (2).to_bytes(4, "little")              # version 2
    assert data[8:16] == (40).to_bytes(8, "little")            # nr_regions
    assert data[16:1024] == bytes(1008)                        # unused, zero
    bits = data[1024:1032]                                     # round_up(40, 32) / 8 = 8 bytes
    assert bits[0] == 0xFF & ~(1 << 3)                         # region 3: bit 3 of byte 0
    assert bits[2] == 0xFF & ~(0b1110)                         # regions 17-19
    assert bits[4] == 0x7F                                     # region 39: bit 7 of byte 4
    assert bits[5:] == bytes(3)                                # padding bits past region 39 are 0
    assert len(data) == 1536 and data[1032:] == bytes(504)     # whole sectors


def test_sizes() -> None:
    assert [disklog.bitset_bytes(n) for n in (1, 32, 33, 64, 65)] == [4, 4, 8, 8, 12]
    assert disklog.log_bytes(32) == 1536 and disklog.log_bytes(32, 4096) == 4096
    assert disklog.log_bytes(8192) == 2048 and disklog.log_bytes(8193) == 2560  # 1024 + 1024 (+4)
    assert len(disklog.encode(100_000, bytes(12_500))) == disklog.log_bytes(100_000)


def test_kernel_resume_rules() -> None:
    data = disklog.encode(32, _bits(32, "1"))
    info = disklog.inspect(data, region_count=40)  # the device grew to 40 regions
    assert ranges(disklog.kernel_resume_bits(info, 40).search(0)) == "1,32-39"
    info = disklog.inspect(data, region_count=20)  # shrunk
    assert ranges(disklog.kernel_resume_bits(info, 20).search(0)) == "1"
    lvm = dict(_vectors())["lvm-fresh"]
    info = disklog.inspect(bytes.fromhex(lvm["hex"]), region_count=8)
    assert disklog.kernel_resume_bits(info, 8).count(1) == 0
    bad = disklog.inspect(bytes(2048), region_count=8)
    assert disklog.kernel_resume_bits(bad, 8).count(1) == 0


def test_notes_and_short_inputs() -> None:
    data = bytearray(disklog.encode(12, _bits(12, "")))
    data[1025] |= 0x80  # a padding bit past region 11
    data[100] = 1
    info = disklog.inspect(bytes(data))
    assert info.kind == "valid" and len(info.notes) == 2
    assert any("padding" in n for n in info.notes) and any("16-1023" in n for n in info.notes)
    assert disklog.inspect(b"").kind == "empty"
    assert disklog.inspect(b"\x72\x52\x69").kind == "too-short"
    zero_regions = disklog.DiskLogHeader.build(dict(magic=disklog.MIRROR_MAGIC, version=2, nr_regions=0))
    assert disklog.inspect(zero_regions.ljust(1536, b"\0")).kind == "no-regions"
    huge = disklog.DiskLogHeader.build(dict(magic=disklog.MIRROR_MAGIC, version=2, nr_regions=2**40))
    assert disklog.inspect(huge.ljust(1536, b"\0")).kind == "too-many-regions"
    with pytest.raises(disklog.DiskLogError):
        disklog.encode(0, b"")


@given(st.integers(1, 3000), st.data())
def test_encode_inspect_round_trip(count: int, data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=(count + 7) // 8, max_size=(count + 7) // 8))
    bits = bitarray(endian="little")
    bits.frombytes(raw)
    del bits[count:]
    out = disklog.encode(count, raw)
    assert len(out) % 512 == 0 and len(out) >= 1024 + disklog.bitset_bytes(count)
    info = disklog.inspect(out)
    assert info.kind == "valid" and info.nr_regions == count and info.clean == bits and not info.notes


def test_write_and_read_files(tmp_path: Path) -> None:
    path = tmp_path / "log"
    target = disklog.write(str(path), 40, _bits(40, "0-3"))
    assert (target.is_block, target.size) == (False, 1536)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(disklog.DiskLogError, match="--overwrite"):
        disklog.write(str(path), 40, _bits(40, ""))
    disklog.write(str(path), 40, _bits(40, ""), overwrite=True)
    info, t = disklog.read(str(path))
    assert info.clean is not None and info.clean.all() and t.size == 1536
    with pytest.raises(disklog.DiskLogError, match="neither"):
        disklog.read(str(tmp_path))


# --- ulog-dump disklog ---------------------------------------------------------------------------


def _file(tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.log"
    p.write_bytes(bytes.fromhex(dict(_vectors())[name]["hex"]))
    return p


def test_dump_valid(tmp_path: Path) -> None:
    p = _file(tmp_path, "regions-40")
    r = ulog_dump("disklog", str(p))
    assert r.rc == 0
    lines = r.out.splitlines()
    assert lines[0] == f"disk log {p} (file, 1536 bytes)"
    assert lines[1:] == [
        "  magic       0x4d695272  ok ('MiRr')",
        "  version     2",
        "  nr_regions  40",
        "  bitset      8 bytes at offset 1024 (40 regions, rounded up to 32 bits)",
        "  clean       35/40  0-2,4-16,20-38",
        "  not clean   5/40  3,17-19,39",
        "  verdict     VALID: the kernel loads these clean bits at the next resume of a 'disk' log of 40 "
        "regions (regions past them, if the table has more, are resynced)",
    ]
    doc = ulog_dump("disklog", str(p), "--json").json
    assert doc == {
        "tool": "ulog-dump", "command": "disklog", "json_version": 1, "path": str(p), "block_device": False,
        "size": 1536, "logical_block_size": 512, "magic": 0x4D695272, "magic_ok": True, "log_version": 2,
        "nr_regions": 40, "verdict": "valid", "valid": True, "reason": doc["reason"], "region_count": 40,
        "bitset_bytes": 8, "clean": 35, "not_clean": 5, "clean_ranges": "0-2,4-16,20-38",
        "not_clean_ranges": "3,17-19,39", "notes": []}


@pytest.mark.parametrize(("name", "verdict", "valid", "words"), [
    ("zeroed", "bad-magic", False, "all zeros (a wiped or never used log device): not a disk log header"),
    ("version-3", "bad-version", False, "unknown version 3"),
    ("too-small", "too-small", False, "too small for nr_regions 100000 (needs 13524"),
    ("lvm-fresh", "lvm-fresh", True, "LVM's fresh-log marker (nr_regions = 2^64-1"),
    ("version-1", "valid", True, "the kernel loads these clean bits"),
])
def test_dump_verdicts(tmp_path: Path, name: str, verdict: str, valid: bool, words: str) -> None:
    p = _file(tmp_path, name)
    doc = ulog_dump("disklog", str(p), "--json").json
    assert (doc["verdict"], doc["valid"]) == (verdict, valid)
    assert words in doc["reason"]
    text = ulog_dump("disklog", str(p)).out
    assert ("  verdict     VALID: " if valid else "  verdict     INVALID: ") in text and words in text


def test_dump_lvm_fresh_with_regions_and_bad_magic_bytes(tmp_path: Path) -> None:
    p = _file(tmp_path, "lvm-fresh")
    text = ulog_dump("disklog", str(p), "--region-count", "100").out
    assert "nr_regions  18446744073709551615  (2^64-1: LVM's fresh-log marker)" in text
    assert "not clean   100/100  0-99" in text
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01\x02\x03\x04" + bytes(2000))
    r = ulog_dump("disklog", str(junk))
    assert r.rc == 0 and "magic       0x04030201  BAD (expected 0x4d695272)" in r.out
    assert "INVALID: bad magic 0x04030201" in r.out
    assert ulog_dump("disklog", str(tmp_path / "missing")).rc == 2


@pytest.fixture
def loopdev(tmp_path: Path):
    """A 64 KiB loop device (root and /dev/loop-control needed; skipped otherwise)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    img = tmp_path / "dev.img"
    img.write_bytes(b"\xaa" * 65536)
    p = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop device: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_write_read_and_exclusive_open(loopdev: str) -> None:
    target = disklog.write(loopdev, 100, _bits(100, "7"))
    assert target.is_block and target.size == 65536 and target.block_size in (512, 4096)
    info, t = disklog.read(loopdev)
    assert t.is_block and info.kind == "valid" and info.nr_regions == 100
    assert info.clean is not None and ranges(info.clean.search(0)) == "7"
    with open(loopdev, "rb") as f:  # the rest of the device is untouched
        data = f.read()
    size = disklog.log_bytes(100, target.block_size)
    assert data[1024 + 16 : size] == bytes(size - 1040) and data[size:] == b"\xaa" * (65536 - size)
    doc = ulog_dump("disklog", loopdev, "--json").json
    assert doc["block_device"] and doc["not_clean_ranges"] == "7" and doc["size"] == 65536
    # A device someone holds exclusively (a mapping, a mount) is refused.
    fd = os.open(loopdev, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(disklog.DiskLogError, match="in use"):
            disklog.write(loopdev, 100, _bits(100, ""))
    finally:
        os.close(fd)
    with pytest.raises(disklog.DiskLogError, match="needs"):
        disklog.write(loopdev, 2**20, bytes(2**17))  # 128 KiB of bits on a 64 KiB device
