"""The hand-written encoders and decoders of the hot cluster messages (FLUSH, DURABLE) against the
one definition, construct's ``messages.Message``: the same bytes both ways, for all inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.cluster import messages as m

_regions = st.lists(st.integers(0, 2**64 - 1), max_size=300)


def _by_definition(kind: m.Kind, **fields: object) -> bytes:
    return m.Message.build({"header": {"kind": kind}, "body": fields})


@given(
    st.integers(0, 2**64 - 1),
    st.text(alphabet=st.characters(max_codepoint=255), max_size=255),
    _regions,
    _regions,
)
def test_flush_both_ways(token: int, uuid: str, marks: list[int], clears: list[int]) -> None:
    data = m.encode(m.Kind.FLUSH, token=token, uuid=uuid, marks=marks, clears=clears)
    assert data == _by_definition(m.Kind.FLUSH, token=token, uuid=uuid, marks=marks, clears=clears)
    fields = m.decode(data).fields
    parsed = m.Message.parse(data).body
    assert (fields.token, fields.uuid, fields.marks, fields.clears) == (
        parsed.token,
        parsed.uuid,
        list(parsed.marks),
        list(parsed.clears),
    )


@given(st.integers(0, 2**64 - 1))
def test_durable_both_ways(epoch: int) -> None:
    data = m.encode(m.Kind.DURABLE, epoch=epoch)
    assert data == _by_definition(m.Kind.DURABLE, epoch=epoch)
    assert m.decode(data).fields.epoch == m.Message.parse(data).body.epoch == epoch


@given(st.binary(max_size=64), st.sampled_from([m.Kind.FLUSH, m.Kind.DURABLE]))
def test_garbage_after_a_hot_header_is_refused_cleanly(tail: bytes, kind: m.Kind) -> None:
    data = b"UC" + bytes([m.MESSAGE_VERSION, kind]) + tail
    try:
        construct_ok = m.Message.parse(data) is not None and len(
            m.Message.build(m.Message.parse(data))
        ) == len(data)
    except Exception:  # noqa: BLE001 - the definition refuses it: so must the fast path
        construct_ok = False
    if construct_ok:
        m.decode(data)
    else:
        with pytest.raises(m.MessageError):
            m.decode(data)
