"""The rolling-batch engine in this process: the real Relay (its reader thread and queues) over a socket pair
instead of the front end's Unix socket, and the real EngineLoop over a real model, with one rank (TP=1).
Tests send request and cancel frames as the front end does and read what rank 0 answers."""
import collections
import json
import socket
import threading
import time

import torch

from handlers.loading import load_model, load_tokenizer
from serving.engine.graphs import Buckets, StepGraphs
from serving.engine.loop import Engine, EngineLoop
from serving.frames import FROM_RANK, Cancel, Chunk, Error, FrameBuffer, Request, Shutdown, encode
from serving.rank.comm import SoloComm
from serving.rank.relay import Relay

_models: dict[str, tuple] = {}


def loaded(model_dir: str):
    """Model and tokenizer, loaded once per test session (fp32)."""
    if model_dir not in _models:
        _models[model_dir] = (load_model(model_dir, torch.float32), load_tokenizer(model_dir))
    return _models[model_dir]


class EngineHarness:
    def __init__(self, model_dir: str, padded: bool = False, compiled: bool = False, **properties):
        """`padded`: run every step the way a CUDA graph would, padded to its bucket (graphs.py), eagerly.
        `compiled`: and through the compiled layers and the variable-length attention operator, as on a GPU."""
        model, tokenizer = loaded(model_dir)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        props = {key: str(value) for key, value in properties.items()}
        self.engine = Engine(model, tokenizer, eos, props, world_size=1)
        if compiled:
            self.engine.runner.varlen = True
            assert self.engine.runner.compile()
        if padded or compiled:
            buckets = Buckets(self.engine.cache.slots, self.engine.settings.prefill_tokens, self.engine.max_len)
            self.engine.graphs = StepGraphs(self.engine.runner, buckets)
        self.tokenizer = tokenizer
        self.relay = Relay(SoloComm(), worker=None, socket_path="unused")
        self.relay.conn, self.sock = socket.socketpair()
        self.frames: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.order: list[tuple[int, str]] = []  # (id, kind) of every frame, in arrival order
        self.cond = threading.Condition()
        self.next_id = 1
        self.loop = EngineLoop(self.engine, self.relay)
        self._threads = [threading.Thread(target=self.relay._read_frames, daemon=True),
                         threading.Thread(target=self.loop.run, daemon=True),
                         threading.Thread(target=self._collect, daemon=True)]
        for thread in self._threads:
            thread.start()

    def submit(self, body: dict | str, headers: dict | None = None) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        if isinstance(body, str):
            properties, data = {"content-type": "text/plain"}, body.encode()
        else:
            properties, data = {"content-type": "application/json"}, json.dumps(body).encode()
        properties.update(headers or {})
        self.sock.sendall(encode(Request(rid, {"properties": properties, "content": {"data": data}})))
        return rid

    def cancel(self, rid: int) -> None:
        self.sock.sendall(encode(Cancel(rid)))

    def wait(self, rid: int, timeout: float = 120) -> list:
        """Every frame of request `rid` up to its answer (response or error)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(not isinstance(f, Chunk) for f in self.frames[rid]):
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"request {rid} not answered in {timeout} s")
            return list(self.frames[rid])

    def wait_first(self, rid: int, timeout: float = 120):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.frames[rid]:
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"request {rid} sent nothing in {timeout} s")
            return self.frames[rid][0]

    def answer(self, rid: int, timeout: float = 120):
        """The decoded JSON body of a non-streamed request, or (code, body) for an error."""
        final = self.wait(rid, timeout)[-1]
        if isinstance(final, Error):
            return final.code, final.message
        output = final.output
        body = json.loads(output["content"][0][1]) if output["content"] else None
        return (output["code"], body) if output["code"] >= 400 else body

    def stream(self, rid: int, timeout: float = 120) -> list[dict]:
        return [json.loads(f.data) for f in self.wait(rid, timeout) if isinstance(f, Chunk)]

    def close(self) -> None:
        self.sock.sendall(encode(Shutdown()))
        self._threads[1].join(30)
        self.sock.close()

    def _collect(self) -> None:
        buffer = FrameBuffer(FROM_RANK)
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            with self.cond:
                for frame in buffer.feed(data):
                    if getattr(frame, "id", None) is None:
                        continue
                    self.frames[frame.id].append(frame)
                    self.order.append((frame.id, frame.kind))
                self.cond.notify_all()


def greedy(max_new_tokens: int, **extra) -> dict:
    return {"max_new_tokens": max_new_tokens, "details": True, **extra}


def token_ids(body: dict) -> list[int]:
    return [token["id"] for token in body["details"]["tokens"]]
