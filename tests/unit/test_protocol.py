"""The front end <-> rank 0 framing (serving/protocol.py), over in-memory readers and socket pairs."""
import asyncio
import socket
import threading

import msgpack
import pytest

from serving import protocol
from serving.protocol import HEADER, MAX_FRAME, ProtocolError, encode, pack, read_frame, recv_frame, unpack


def read_from_bytes(data: bytes, frames: int = 1, eof: bool = True) -> list[dict]:
    """Feed `data` to a StreamReader and read `frames` frames from it."""
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return [await read_frame(reader) for _ in range(frames)]
    return asyncio.run(main())


def raw_frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


# --- encoding -------------------------------------------------------------------------------------------

def test_encode_prefixes_big_endian_length():
    data = encode({"kind": "ready"})
    body = pack({"kind": "ready"})
    assert data[:4] == len(body).to_bytes(4, "big")
    assert data[4:] == body


def test_pack_unpack_round_trip():
    message = {"kind": "request", "id": 7, "input": {"properties": {"a": "b"}, "content": {"data": b"\x00\x01"}}}
    assert unpack(pack(message)) == message


def test_encode_refuses_frame_over_limit(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 16)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"kind": "chunk", "data": b"x" * 32})


# --- read_frame (front end, asyncio) --------------------------------------------------------------------

def test_read_frame_round_trip():
    message = {"kind": "response", "id": 3, "output": {"code": 200, "message": "OK"}}
    assert read_from_bytes(encode(message)) == [message]


def test_read_frame_back_to_back_frames():
    messages = [{"kind": "chunk", "id": 1, "data": b"a"}, {"kind": "chunk", "id": 1, "data": b"b"},
                {"kind": "response", "id": 1, "output": {}}]
    assert read_from_bytes(b"".join(encode(m) for m in messages), frames=3) == messages


def test_read_frame_preserves_bytes():
    payload = bytes(range(256))
    (frame,) = read_from_bytes(encode({"kind": "chunk", "id": 1, "data": payload, "text": "é"}))
    assert type(frame["data"]) is bytes
    assert frame["data"] == payload
    assert frame["text"] == "é"


def test_read_frame_waits_for_data_fed_in_pieces():
    data = encode({"kind": "heartbeat", "seq": 5, "busy_for": 1.5})

    async def main():
        reader = asyncio.StreamReader()
        task = asyncio.ensure_future(read_frame(reader))
        for i in range(len(data)):
            reader.feed_data(data[i:i + 1])
            await asyncio.sleep(0)
        return await task
    assert asyncio.run(main()) == {"kind": "heartbeat", "seq": 5, "busy_for": 1.5}


@pytest.mark.parametrize("obj", [[1, 2, 3], "kind", 42, {"id": 1}, {"Kind": "ready"}])
def test_read_frame_refuses_non_map_or_map_without_kind(obj):
    with pytest.raises(ProtocolError, match="not a map with a kind"):
        read_from_bytes(raw_frame(obj))


def test_read_frame_refuses_oversized_length():
    with pytest.raises(ProtocolError, match="exceeds"):
        read_from_bytes(HEADER.pack(MAX_FRAME + 1), eof=False)


def test_read_frame_on_closed_peer_raises_incomplete_read():
    with pytest.raises(asyncio.IncompleteReadError):
        read_from_bytes(b"")


def test_read_frame_on_truncated_frame_raises_incomplete_read():
    with pytest.raises(asyncio.IncompleteReadError):
        read_from_bytes(encode({"kind": "ready", "pad": "x" * 50})[:-10])


@pytest.mark.parametrize("body", [b"\xc1", b"\x81\xa4kind\xa1x\x00"])
def test_read_frame_refuses_undecodable_body(body):
    with pytest.raises(ProtocolError):
        read_from_bytes(HEADER.pack(len(body)) + body)


# --- recv_frame (rank side, blocking socket) ------------------------------------------------------------

def test_recv_frame_round_trip(pair):
    a, b = pair
    message = {"kind": "request", "id": 9, "input": {"content": {"data": b"\xff\x00"}}}
    a.sendall(encode(message))
    frame = recv_frame(b)
    assert frame == message
    assert type(frame["input"]["content"]["data"]) is bytes


def test_recv_frame_back_to_back_frames(pair):
    a, b = pair
    a.sendall(encode({"kind": "cancel", "id": 1}) + encode({"kind": "heartbeat", "seq": 2}))
    assert recv_frame(b) == {"kind": "cancel", "id": 1}
    assert recv_frame(b) == {"kind": "heartbeat", "seq": 2}


def test_recv_frame_large_frame_read_in_parts(pair):
    a, b = pair
    payload = bytes(range(256)) * 8192  # 2 MiB: more than one recv() returns
    sender = threading.Thread(target=a.sendall, args=(encode({"kind": "request", "id": 1, "data": payload}),))
    sender.start()
    frame = recv_frame(b)
    sender.join(timeout=10)
    assert frame["data"] == payload


def test_recv_frame_returns_none_when_peer_closes(pair):
    a, b = pair
    a.close()
    assert recv_frame(b) is None


def test_recv_frame_returns_none_when_peer_closes_mid_frame(pair):
    a, b = pair
    a.sendall(encode({"kind": "ready", "pad": "x" * 50})[:-10])
    a.close()
    assert recv_frame(b) is None


def test_recv_frame_refuses_oversized_length(pair):
    a, b = pair
    a.sendall(HEADER.pack(MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        recv_frame(b)


def test_recv_frame_refuses_map_without_kind(pair):
    a, b = pair
    a.sendall(raw_frame({"id": 1}))
    with pytest.raises(ProtocolError):
        recv_frame(b)
