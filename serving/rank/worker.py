"""What every rank does with a unit of work rank 0 broadcast: load the handler, or run it on a batch.

Every rank runs exactly the same calls in the same order with the same random seed: that is what keeps
the ranks' collective operations (tensor-parallel all-reduces) in step. Only rank 0's results leave the
group; the relay sends them.
"""
import importlib
import importlib.util
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from serving.frames import Batch, Init
from serving.heap import freeze_loaded_objects
from serving.logs import REQUEST_ID
from serving.rank.hints import explain
from serving.rank.inputs import Input
from serving.rank.outputs import Output

log = logging.getLogger("tpserve.rank")


class HandlerError(Exception):
    """The handler raised, or returned something that is not an Output; the message is for the client."""


class Worker:
    def __init__(self, rank: int):
        self.rank = rank
        self.properties: dict[str, str] = {}
        self.handle: Callable[[Input], Output | None] | None = None
        self.engine = None  # the handler's rolling-batch engine, when it offers one
        self.facts: dict = {}  # what the handler tells of its model once loaded (describe_model), for GET /info

    def load(self, unit: Init, on_stage: Callable[[str], None] = lambda stage: None) -> str | None:
        """Import the entry point and warm it up with an empty Input (DJL's initialisation call, where
        handlers written like the article's load their model). Returns an error message, or None.
        `on_stage` hears each load stage as it ends ("model_loaded", then "engine_ready" with an engine)."""
        self.properties = unit.properties
        started = time.monotonic()
        log.info("rank[%d] start load model %s", self.rank, self.properties.get("model_id"))
        try:
            module = import_entry_point(unit.entry_point, self.properties["model_dir"])
            self.handle = getattr(module, "handle", None)
            if not callable(self.handle):
                return f"entry point {unit.entry_point} has no handle(inputs) function"
            self.handle(Input(self.properties))
            on_stage("model_loaded")
            # A handler that can batch at the step level offers `rolling_batch_engine(properties)`: an engine
            # object, or None when option.rolling_batch=disable (or the model cannot run in it).
            make_engine = getattr(module, "rolling_batch_engine", None)
            self.engine = make_engine(self.properties) if callable(make_engine) else None
            if self.engine is not None:
                on_stage("engine_ready")  # KV cache allocated, warm-up step run
            describe = getattr(module, "describe_model", None)  # optional: context length, dtype, device
            self.facts = describe() if callable(describe) else {}
        except BaseException as exc:  # noqa: BLE001 - any failure, even SystemExit, must reach the front end
            log.exception("rank[%d] failed to load the model", self.rank)
            return explain(exc)
        log.info("rank[%d] model loaded in %d ms", self.rank, (time.monotonic() - started) * 1000)
        freeze_loaded_objects(f"rank[{self.rank}]")
        return None

    def run(self, unit: Batch, cancelled: Callable[[int], bool],
            write_chunk: Callable[[int, bytes], None] | None = None) -> tuple[Output, Iterator[bytes] | None]:
        """Run the handler on the unit's requests. Returns rank 0's Output and, for a streaming handler,
        an iterator of encoded chunks that must be exhausted (on every rank) to finish the work.
        `cancelled(id)` tells whether a request's client left; `write_chunk(id, data)` streams to it now."""
        seed_everything(unit.seed)
        items = unit.items
        # this unit's request ids (X-Request-Id) on every line logged on this rank until the next unit
        REQUEST_ID.set(",".join(str(item.input["properties"].get("x-request-id", item.id)) for item in items))
        push = write_chunk or (lambda rid, data: None)
        inputs = [Input({**item.input["properties"], **self.properties}, item.input["content"],
                        cancelled=lambda rid=item.id: cancelled(rid),
                        chunk_writer=lambda value, rid=item.id: push(rid, encode_chunk(value)))
                  for item in items]
        request = inputs[0] if len(inputs) == 1 else Input({**self.properties, "batch_size": str(len(inputs))},
                                                           batch=inputs)
        try:
            output = self.handle(request)
        except Exception as exc:
            log.exception("rank[%d] handler raised", self.rank)
            raise HandlerError(explain(exc)) from exc
        if not isinstance(output, Output):
            raise HandlerError(f"the handler returned {type(output).__name__}, not an Output")
        if output.stream_content is None:
            return output, None
        if len(items) > 1:
            raise HandlerError("a streaming handler needs batch_size=1")
        return output, (encode_chunk(item) for item in output.stream_content)


def import_entry_point(entry_point: str, model_dir: str):
    # A model.py may import its siblings, as under DJL.
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    if entry_point.endswith(".py"):
        path = Path(entry_point)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(entry_point)


def seed_everything(seed: int) -> None:
    """Same seed on every rank, so sampling handlers draw the same tokens on every rank."""
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    import torch
    # Not torch.manual_seed: on a machine without a GPU it also queues lazy seeds for CUDA, XPU and MTIA, each
    # with a formatted stack trace, ~0.4 ms per call on every rank for every unit (2 us this way).
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def encode_chunk(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    import json
    return (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")
