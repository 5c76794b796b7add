"""Typed frames (serving/frames.py): every kind survives the wire, each way it may travel; a map that is not such
a frame is refused with a message naming the problem; a byte stream splits into frames however it arrives."""
import msgpack
import pytest

from serving import frames
from serving.frames import (FROM_RANK, TO_RANK, UNITS, Batch, Cancel, Chunk, Error, FrameBuffer, FrameError, Heartbeat,
                            HeartbeatReply, Init, Progress, Ready, Request, Response, Shutdown, Started, Step, encode,
                            encode_all, pack_units, unpack_units)
from serving.protocol import HEADER, MAX_FRAME, ProtocolError

INPUT = {"properties": {"content-type": "text/plain", "x-request-id": "abc"}, "content": {"data": b"\x00\xffhi"}}
OUTPUT = {"code": 200, "message": "OK", "properties": {"content-type": "application/json"},
          "content": [("data", b'{"echo": "hi"}')]}

TO_RANK_FRAMES = [Init({"model_dir": "/m", "batch_size": "4"}, "handlers.echo"), Request(7, INPUT), Cancel(7),
                  Heartbeat(3), Shutdown()]
FROM_RANK_FRAMES = [Ready(), Progress("model_loaded"), Started([7, 8]), Chunk(7, b'{"token": 1}\n'),
                    Chunk(7, b"first", {"content-type": "application/jsonlines"}), Response(7, OUTPUT),
                    Response(8, OUTPUT, {"prompt_tokens": 3, "generated_tokens": 5}), Error(424, "boom", 7),
                    Error(500, "the group failed"), HeartbeatReply(3, 41, True, 2),
                    HeartbeatReply(4, 42, False, 0, {"running": 1, "waiting": 0, "kv_used_tokens": 9,
                                                     "kv_total_tokens": 100})]
UNIT_FRAMES = [Init({"model_dir": "/m"}, "model.py"), Batch(12345, [Request(1, INPUT), Request(2, INPUT)]),
               Step(b"\x01\x02\x03"), Shutdown()]


def decode_one(kinds, frame):
    (decoded,) = FrameBuffer(kinds).feed(encode(frame))
    return decoded


def as_wire(frame):
    """What the peer's msgpack gives back: tuples become lists."""
    return msgpack.unpackb(msgpack.packb(frame.to_map(), use_bin_type=True), raw=False)


@pytest.mark.parametrize("frame", TO_RANK_FRAMES, ids=lambda f: f.kind)
def test_every_kind_to_rank_0_round_trips(frame):
    decoded = decode_one(TO_RANK, frame)
    assert type(decoded) is type(frame)
    assert decoded == frame


@pytest.mark.parametrize("frame", FROM_RANK_FRAMES, ids=lambda f: f.kind)
def test_every_kind_from_rank_0_round_trips(frame):
    decoded = decode_one(FROM_RANK, frame)
    assert type(decoded) is type(frame)
    assert decoded.to_map() == as_wire(frame)  # content entries come back as lists, not tuples


def test_every_unit_round_trips_in_one_broadcast():
    assert unpack_units(pack_units(UNIT_FRAMES)) == UNIT_FRAMES
    batch = unpack_units(pack_units([UNIT_FRAMES[1]]))[0]
    assert [type(item) for item in batch.items] == [Request, Request]
    assert type(batch.items[0].input["content"]["data"]) is bytes


def test_heartbeat_is_a_ping_one_way_and_a_reply_the_other():
    assert type(decode_one(TO_RANK, Heartbeat(1))) is Heartbeat
    assert type(decode_one(FROM_RANK, HeartbeatReply(1, 2, False, 0))) is HeartbeatReply


def test_optional_fields_left_out_on_the_wire():
    assert Chunk(1, b"x").to_map() == {"kind": "chunk", "id": 1, "data": b"x"}
    assert Error(500, "down").to_map() == {"kind": "error", "code": 500, "message": "down"}
    assert decode_one(FROM_RANK, Error(500, "down")).id is None


def test_many_frames_in_one_write_come_out_in_order():
    data = encode_all(FROM_RANK_FRAMES)
    assert [f.kind for f in FrameBuffer(FROM_RANK).feed(data)] == [f.kind for f in FROM_RANK_FRAMES]


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_a_stream_split_anywhere_gives_the_same_frames(piece):
    data = encode_all(FROM_RANK_FRAMES)
    buffer = FrameBuffer(FROM_RANK)
    got = []
    for start in range(0, len(data), piece):
        got += buffer.feed(data[start:start + piece])
    assert [f.to_map() for f in got] == [as_wire(f) for f in FROM_RANK_FRAMES]


def test_a_large_frame_in_many_pieces():
    payload = bytes(range(256)) * 8192  # 2 MiB
    data = encode(Request(1, {"properties": {}, "content": {"data": payload}})) + encode(Cancel(1))
    buffer = FrameBuffer(TO_RANK)
    got = []
    for start in range(0, len(data), 65536):
        got += buffer.feed(data[start:start + 65536])
    assert [type(f) for f in got] == [Request, Cancel]
    assert got[0].input["content"]["data"] == payload


# --- refusals ---------------------------------------------------------------------------------------------

def raw(message) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def test_unknown_kind_is_refused_by_name():
    with pytest.raises(FrameError, match=r"unknown frame kind 'teleport' \(expected one of cancel, heartbeat, init, "
                                         r"request, shutdown\)"):
        FrameBuffer(TO_RANK).feed(raw({"kind": "teleport", "id": 1}))


def test_a_kind_that_travels_the_other_way_is_unknown_here():
    with pytest.raises(FrameError, match="front end -> rank 0: unknown frame kind 'response'"):
        FrameBuffer(TO_RANK).feed(encode(Response(1, OUTPUT)))
    with pytest.raises(FrameError, match="rank 0 -> front end: unknown frame kind 'request'"):
        FrameBuffer(FROM_RANK).feed(encode(Request(1, INPUT)))
    with pytest.raises(FrameError, match="unknown frame kind 'chunk'"):
        UNITS.decode({"kind": "chunk", "id": 1, "data": b""})


@pytest.mark.parametrize("message", [{"id": 1}, {"Kind": "cancel", "id": 1}, {"kind": None}, {"kind": 3}])
def test_a_map_without_a_kind_is_refused(message):
    with pytest.raises(FrameError, match="unknown frame kind"):
        TO_RANK.decode(message)


def test_missing_field_is_named():
    with pytest.raises(FrameError, match=r"'request' frame: missing field\(s\) input"):
        FrameBuffer(TO_RANK).feed(raw({"kind": "request", "id": 1}))
    with pytest.raises(FrameError, match=r"'heartbeat' frame: missing field\(s\) progress, has_work, queued"):
        FROM_RANK.decode({"kind": "heartbeat", "seq": 1})
    with pytest.raises(FrameError, match=r"'batch' frame: missing field\(s\) items"):
        UNITS.decode({"kind": "batch", "seed": 1})


def test_unknown_field_is_named():
    with pytest.raises(FrameError, match=r"'cancel' frame: unknown field\(s\) reason"):
        TO_RANK.decode({"kind": "cancel", "id": 1, "reason": "bored"})


def test_malformed_batch_items_are_refused():
    with pytest.raises(FrameError, match="'batch' frame"):
        UNITS.decode({"kind": "batch", "seed": 1, "items": [[1, INPUT, "extra"]]})


@pytest.mark.parametrize("obj", [[1, 2], "cancel", 42])
def test_a_frame_that_is_not_a_map_is_refused(obj):
    with pytest.raises(FrameError, match="a frame is a map"):
        FrameBuffer(TO_RANK).feed(raw(obj))


def test_a_broadcast_that_is_not_an_array_is_refused():
    with pytest.raises(FrameError, match="array of units"):
        unpack_units(msgpack.packb({"kind": "shutdown"}))


def test_undecodable_body_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not msgpack"):
        FrameBuffer(TO_RANK).feed(HEADER.pack(1) + b"\xc1")


def test_oversized_length_is_refused_before_reading_it():
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameBuffer(TO_RANK).feed(HEADER.pack(MAX_FRAME + 1))


def test_oversized_frame_is_not_encoded(monkeypatch):
    monkeypatch.setattr(frames, "MAX_FRAME", 16)
    with pytest.raises(ProtocolError, match="chunk frame of .* exceeds"):
        encode(Chunk(1, b"x" * 32))
