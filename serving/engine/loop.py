"""The engine as a whole: every rank's runner over its slot cache, and rank 0's loop that drives it.

Rank 0, each step:
  gather   new requests (parsed and tokenised by the intake thread), cancels, expired deadlines, a shutdown
  schedule decode every running row, prefill new ones under the slot and prefill-token budgets (scheduler.py)
  send     the plan to every rank (a few hundred bytes; plan.py)
  run      the same forward on every rank (runner.py)
  sample   each row's next token with its own parameters (sampling.py), detokenise, stream, finish
Other ranks run `Engine.step` for each plan rank 0 sends (serving/rank/relay.py: follow). Generation stays on
each rank's main thread; rank 0's intake thread only parses and tokenises, so a huge prompt never holds a step.
"""
import collections
import copy
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from serving.engine import allreduce, attention, gemv, residual
from serving.engine.constraints import grammar_for
from serving.engine.detokenize import Sequence, token_text
from serving.engine.formats import Answers, output_format
from serving.engine.fuse import fuse_projections
from serving.engine.graphs import Buckets, StepGraphs
from serving.engine.intake import RequestError, parse_request, tokenize, wants_stream
from serving.engine.kv_cache import SlotCache, bytes_per_token, plan_slots
from serving.engine.plan import Chunk, StepPlan
from serving.engine.request import Request, Row
from serving.engine.runner import Feed, ModelRunner
from serving.engine.sampling import Draw, Drawn, SamplingRow, queue_draws
from serving.engine.scheduler import Kept, Scheduler
from serving.engine.timeline import Timeline
from serving.engine.transfer import device_tensor
from serving.frames import Error, Frame, Request as RequestFrame, Response, Started, Step
from serving.rank.inputs import Input
from serving.rank.outputs import Output
from serving.schemas import MAX_SEED, Token

log = logging.getLogger("tpserve.engine")
IDLE_WAIT = 0.5  # seconds the idle loop sleeps between looks at deadlines
ACTIVATION_RESERVE = 1 << 30  # GPU bytes kept free of the KV cache for activations and the allocator
# How long another thread of rank 0 (intake, the relay's reader and writer) may hold the GIL before the loop gets
# it back (Python's default is 5 ms). The loop gives the GIL up several times a step (waiting for the device,
# sending); while the intake thread tokenises a burst of requests, each of those could cost it the whole
# interval, and the device waited. TPSERVE_SWITCH_INTERVAL_MS overrides it (A/B benchmarks).
SWITCH_INTERVAL = float(os.environ.get("TPSERVE_SWITCH_INTERVAL_MS", "0.5")) / 1000


@dataclass
class EngineSettings:
    """The engine's keys from serving.properties (option.* without the prefix; serving/config.py validates them)."""

    max_rows: int = 32  # option.max_rolling_batch_size
    prefill_tokens: int = 4096  # option.max_rolling_batch_prefill_tokens
    max_model_len: int | None = None  # option.max_model_len: tokens one sequence may hold
    kv_cache_tokens: int | None = None  # option.max_kv_cache_tokens: the KV budget, in tokens
    memory_utilization: float = 0.9  # option.gpu_memory_utilization: share of GPU memory for weights and KV
    predict_timeout: float = 120.0
    cuda_graph: bool = True  # option.enable_cuda_graph: capture steps in CUDA graphs (on CUDA, with flash)
    torch_compile: bool = True  # option.torch_compile: compile the captured forward (fused small kernels)

    @classmethod
    def from_properties(cls, properties: dict[str, str]) -> "EngineSettings":
        def value(key: str, default, kind=int):
            text = properties.get(key)
            return default if text in (None, "") else kind(text)

        return cls(max_rows=value("max_rolling_batch_size", cls.max_rows),
                   prefill_tokens=value("max_rolling_batch_prefill_tokens", cls.prefill_tokens),
                   max_model_len=value("max_model_len", None), kv_cache_tokens=value("max_kv_cache_tokens", None),
                   memory_utilization=value("gpu_memory_utilization", cls.memory_utilization, float),
                   predict_timeout=value("predict_timeout", cls.predict_timeout, float),
                   cuda_graph=value("enable_cuda_graph", "true", str).lower() == "true",
                   torch_compile=value("torch_compile", "true", str).lower() == "true")


def supports(model) -> bool:
    """The engine needs a model whose attention goes through transformers' attention-function registry."""
    return bool(getattr(model, "_supports_attention_backend", False))


class Engine:
    """Every rank's part: the slot cache and the model runner, over the model the handler loaded."""

    def __init__(self, model, tokenizer, eos: set[int], properties: dict[str, str], world_size: int):
        started = time.monotonic()
        self.settings = EngineSettings.from_properties(properties)
        self.properties = properties
        self.tokenizer = tokenizer
        self.eos = eos
        self.device = next(model.parameters()).device
        use_slot_attention(model)
        fuse_projections(model)  # before the KV budget is measured: fusing moves weights
        allreduce.install(model)  # TP > 1: the row-parallel all-reduces take the one-shot kernel (collective)
        residual.install(model)  # TP > 1: each all-reduce joined to the residual add (and norm) after it
        self.max_len = model_max_len(model.config, self.settings.max_model_len)
        budget = self._budget_tokens(model, world_size)
        self.cache = SlotCache(_agreed(plan_slots(self.settings.max_rows, self.max_len, budget), world_size,
                                       self.device), self.max_len, model)
        self.runner = ModelRunner(model, self.cache, self.device)
        self.world_size = world_size
        # the tokens rank 0 sampled in the last step, on the device, that the next step's decode rows take
        # (plan.fed); other ranks receive them by broadcast, so no rank waits for the host to read them
        self.sampled = torch.zeros(self.cache.slots, dtype=torch.long, device=self.device)
        self.runner.run(StepPlan(prefill=[Chunk(0, 0, [0, 0])], keep=[1]))  # warm-up: every layer allocates K/V
        self.graphs = self._capture()
        log.info("rolling batch ready in %.1f s: %d rows of up to %d tokens, KV cache %.1f MiB on this rank, "
                 "prefill budget %d tokens per step, attention %s", time.monotonic() - started, self.cache.slots,
                 self.max_len, self.cache.bytes / 2**20, self.settings.prefill_tokens,
                 "flash (variable length)" if self.runner.varlen else "SDPA")

    def describe(self, plan: StepPlan) -> tuple[str, int, int]:
        """The step's kind for the timeline (its graph, or eager), its tokens and the tokens its graph pads to."""
        shape = self.graphs.buckets.pick(plan) if self.graphs is not None else None
        if shape is None:
            kind = ("prefill" if plan.prefill else "decode") + (" eager" if self.graphs else "")
            return kind, plan.n_tokens, plan.n_tokens
        return f"{'prefill' if shape.prefill else 'decode'} {shape.tokens}", plan.n_tokens, shape.tokens

    def step(self, plan: StepPlan) -> torch.Tensor:
        """Queue the plan's forward on the device; its kept logits, [len(plan.keep), vocab] float32."""
        feed = None
        if plan.fed:
            if self.world_size > 1:  # every rank reaches this with the same plan, so the calls pair up
                torch.distributed.broadcast(self.sampled, src=0)
            feed = Feed.of(plan, self.sampled)
        logits = self.graphs.run(plan, feed) if self.graphs is not None else None
        return self.runner.run(plan, feed) if logits is None else logits

    def keep_sampled(self, tokens: torch.Tensor) -> None:
        """Rank 0: the tokens just sampled, for the next step's plan.fed (queued, no wait)."""
        self.sampled[:len(tokens)].copy_(tokens)

    def _capture(self) -> StepGraphs | None:
        """CUDA graphs of every step shape, unless option.enable_cuda_graph=false or the device cannot."""
        if not self.settings.cuda_graph or self.device.type != "cuda":
            return None
        if not self.runner.varlen:
            log.warning("steps run eagerly: CUDA graphs need flash attention's variable-length kernel with "
                        "per-sequence key counts (fp16 or bf16, and a torch that has it)")
            return None
        # projections of a few rows stream the weights (Triton): a win where the step is replayed, not where each
        # kernel is launched from Python (cuBLAS launches cheaper), so only with graphs
        gemv.install(self.runner.model)
        buckets = Buckets(self.cache.slots, self.settings.prefill_tokens, self.max_len)
        reserved = torch.cuda.memory_reserved(self.device)
        if self.settings.torch_compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "tpserve" / "inductor"))
            self.runner.compile()
        try:
            graphs = StepGraphs(self.runner, buckets)
            seconds = graphs.capture()
        except Exception:
            if self.runner.compiled is None:
                raise
            log.exception("torch.compile failed; capturing the uncompiled forward instead "
                          "(option.torch_compile=false skips the attempt)")
            self.runner.compiled = None
            graphs = StepGraphs(self.runner, buckets)
            seconds = graphs.capture()
        log.info("%s %d CUDA graphs of the step in %.1f s (%.0f MiB more GPU memory reserved)",
                 "compiled and captured" if self.runner.compiled is not None else "captured", len(graphs.graphs),
                 seconds, (torch.cuda.memory_reserved(self.device) - reserved) / 2**20)
        return graphs

    def _budget_tokens(self, model, world_size: int) -> int | None:
        if self.settings.kv_cache_tokens is not None:
            return self.settings.kv_cache_tokens
        if self.device.type != "cuda":
            return None  # on CPUs: max_rolling_batch_size rows of max_model_len tokens
        free, total = torch.cuda.mem_get_info(self.device)
        usable = total * self.settings.memory_utilization - (total - free) - ACTIVATION_RESERVE
        tokens = max(0, int(usable)) // bytes_per_token(model.config, world_size, next(model.parameters()).dtype)
        return max(0, tokens - self.max_len)  # the cache's scratch slot (kv_cache.py) comes on top of the rows


def use_slot_attention(model) -> None:
    name = attention.register()
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):  # a transformers release that checks names against its own list
        model.config._attn_implementation = name


def model_max_len(config, configured: int | None) -> int:
    """Tokens one sequence may hold: option.max_model_len, at most the model's context (and its sliding window,
    which this engine does not apply)."""
    text = getattr(config, "text_config", config)
    limits = [getattr(text, "max_position_embeddings", None)]
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        limits.append(text.sliding_window)
    context = min((limit for limit in limits if limit), default=2048)
    if configured is None:
        return context
    if configured > context:
        log.warning("option.max_model_len=%d exceeds the model's %d tokens; using %d", configured, context, context)
    return min(configured, context)


def _agreed(slots: int, world_size: int, device: torch.device) -> int:
    """Every rank must hold the same slots (rank 0's plans index them): the smallest count any rank can afford."""
    if world_size > 1 and torch.distributed.is_initialized():
        count = torch.tensor([slots], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        return int(count.item())
    return slots


class EngineLoop:
    """Rank 0's loop. `relay` (serving/rank/relay.py) owns the socket to the front end and the queues its reader
    thread fills: `pending` requests, `cancelled` ids and `control` frames, all guarded by `relay.cond`."""

    def __init__(self, engine: Engine, relay):
        self.engine = engine
        self.relay = relay
        self.scheduler = Scheduler(engine.cache.slots, engine.settings.prefill_tokens)
        self.requests: dict[int, Request] = {}
        self.inbox: collections.deque[Request] = collections.deque()  # tokenised, not yet scheduled
        self.in_intake: set[int] = set()
        self.drawn: tuple[list[Row], Drawn] | None = None  # sampled last step, not yet read on the host
        self.stopping = False
        # the intake thread tokenises with its own copy: a fast tokenizer used from two threads at once can fail
        self.intake_tokenizer = copy.deepcopy(engine.tokenizer)
        relay.engine_stats = self.stats
        self.timeline = Timeline.from_env(engine.device)  # TPSERVE_STEP_TIMELINE: benchmarks (timeline.py)

    def stats(self) -> dict:
        """Occupancy for rank 0's heartbeats (the front end exports it as gauges); read from the reader thread."""
        running = list(self.scheduler.running)
        return {"running": len(running), "waiting": len(self.scheduler.waiting) + len(self.inbox),
                "kv_used_tokens": sum(row.cached for row in running), "kv_total_tokens": self.engine.cache.tokens}

    def run(self) -> None:
        """Until the front end sends a control frame (shutdown); the relay handles it."""
        sys.setswitchinterval(SWITCH_INTERVAL)
        intake = threading.Thread(target=self._intake, name="intake", daemon=True)
        intake.start()
        try:
            while self._gather():
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - a failed step fails its rows, never the loop
                    log.exception("engine step failed; failing its requests")
                    self._fail_all(500, "the engine failed while generating; see the server log")
        finally:
            if self.timeline:
                self.timeline.flush()
                self.timeline.close()
            with self.relay.cond:
                self.stopping = True
                self.relay.cond.notify_all()

    # --- each step ------------------------------------------------------------------------------
    def _gather(self) -> bool:
        """Take new requests and cancels; wait while there is nothing to do. False once a control frame waits."""
        relay = self.relay
        with relay.cond:
            while True:
                if relay.control:
                    return False
                arrived = list(self.inbox)
                self.inbox.clear()
                cancelled = self._take_cancels()
                if arrived or cancelled or self.scheduler.has_work() or self.drawn:
                    break
                relay.working = False
                if self.timeline:  # idle: every recorded step is done
                    self.timeline.flush()
                relay.cond.wait(IDLE_WAIT)
        for request in arrived:
            self.requests[request.id] = request
            self.scheduler.add(request.rows)
        for request in cancelled:
            self._drop(request, "cancelled")
            log.info("generation cancelled (client gone) after %d tokens",
                     sum(len(row.sequence.ids) for row in request.rows))
        now = time.monotonic()
        for request in [r for r in self.requests.values() if r.deadline < now]:
            self._drop(request, "cancelled")
            self.relay.send_frames([Error(504, f"no answer within option.predict_timeout="
                                              f"{self.engine.settings.predict_timeout:g} s", request.id)])
        return True

    def _take_cancels(self) -> list[Request]:
        """Requests the front end cancelled (called under relay.cond). Ids of requests no longer anywhere here
        (answered already) are forgotten; ids still being tokenised wait for their request."""
        found = []
        for rid in list(self.relay.cancelled):
            if rid in self.in_intake:
                continue
            self.relay.cancelled.discard(rid)
            request = self.requests.get(rid) or next((r for r in self.inbox if r.id == rid), None)
            if request is not None:
                if request in self.inbox:
                    self.inbox.remove(request)
                found.append(request)
        return found

    def _step(self) -> None:
        """One step, pipelined so that the device never waits for the host:
        1. plan this step and queue its forward. Decode rows take the tokens sampled last step straight from
           the device (plan.fed): the host has not read them yet;
        2. read last step's tokens (this waits for last step, while this step's forward is queued behind it),
           decide which rows they end, detokenise and stream them;
        3. queue this step's sampling, with each row's penalties, masks and counts as of last step's token.
        A row whose token ends it (end of sequence, a stop sequence) is known in 2, one step after it was
        sampled: it has run one more forward, whose token is dropped, and its slot is free from the next plan
        on. Ends the host knows before the token (max_new_tokens, the row's room in its slot) stop the row from
        being fed at once."""
        plan, kept = self.scheduler.schedule()
        logits = None
        timeline = self.timeline if plan.n_tokens else None
        if timeline:
            timeline.begin(*self.engine.describe(plan))
        if plan.n_tokens:
            admitted = {self.scheduler.row_in(chunk.slot).request.id for chunk in plan.prefill if chunk.start == 0}
            if admitted:  # the front end measures queue wait and batch occupancy from it
                self.relay.send_frames([Started(sorted(admitted))])
            self.relay.working = True  # has work: the watchdog expects progress
            self.relay.comm.broadcast(Step(plan.pack()))
            logits = self.engine.step(plan)
            if timeline:
                timeline.queued()
        drawn, self.drawn = self.drawn, None
        if drawn is not None:
            self.relay.send_frames(self._emit(*drawn))
            if timeline:
                timeline.mark("emitted")
        if logits is not None:
            self.drawn = self._sample(kept, logits)
            if timeline:
                timeline.mark("sampled")
        self.relay.note_progress()  # the watchdog counts time since the last step, not since a unit began

    def _sample(self, kept: list[Kept], logits: torch.Tensor) -> tuple[list[Row], Drawn] | None:
        """Queue the draw of the next token of each row that produces one this step, and feed those tokens to
        the next step; record prompt log-probabilities."""
        sampled = [i for i, k in enumerate(kept) if k.prompt_index is None and not k.row.done]
        prompt = [i for i, k in enumerate(kept) if k.prompt_index is not None]
        if prompt:  # decoder_input_details: one log-softmax over every prompt position kept this step
            targets = torch.tensor([kept[i].row.prompt_ids[kept[i].prompt_index] for i in prompt], device=logits.device)
            values = torch.log_softmax(logits[prompt], -1).gather(1, targets[:, None])[:, 0].tolist()
            for i, value in zip(prompt, values):
                kept[i].row.prompt_log_probs.append(value)
        rows = [kept[i].row for i in sampled]
        if not rows:
            return None
        if len(sampled) < len(kept):
            logits = logits[device_tensor(sampled, logits.device)]  # logits[list] would wait for the device
        drawn = queue_draws(logits, [SamplingRow(row.request.params, row.generator, lambda row=row: row.history,
                                                len(row.sequence.ids), self.engine.eos, row.sequence.constraint)
                                    for row in rows])
        self.engine.keep_sampled(drawn.tokens)
        for index, row in enumerate(rows):
            # the token drawn now is the row's (len(ids) + 1)-th; past max_new_tokens or its slot nothing follows
            if len(row.sequence.ids) + 1 < row.request.params.max_new_tokens and row.cached < self.engine.max_len:
                row.fed = index
        return rows, drawn

    def _emit(self, rows: list[Row], drawn: Drawn) -> list[Frame]:
        """Read a step's drawn tokens; detokenise and stream them, finish the rows they end; the frames to send."""
        frames: list[Frame] = []
        for row, token in zip(rows, drawn.resolve()):
            if row.done:  # cancelled or expired since the draw: its token is dropped
                continue
            row.ending = row.sequence.token_finish(token.token, self.engine.eos, len(row.sequence.ids) + 1)
            if row.ending is None and row.cached >= self.engine.max_len:
                row.ending = "length"  # no room left in the row's slot to feed this token
            self._advance(row, token, frames)
        return frames

    def _advance(self, row: Row, draw: Draw, frames: list[Frame]) -> None:
        sequence, request = row.sequence, row.request
        tokenizer = self.engine.tokenizer
        if not sequence.ids and request.params.details and request.params.decoder_input_details:
            sequence.prefill = prompt_details(tokenizer, row)
        top = [Token(id=i, text=token_text(tokenizer)(i), log_prob=lp) for i, lp in draw.top] if draw.top else None
        text = sequence.add(draw.token, draw.log_prob, top)
        reason = row.ending or sequence.text_finish()
        if reason is not None:
            text += sequence.close(reason)
            self.scheduler.release(row)
        if request.stream:
            frames.append(self.relay.chunk_frame(request.id, request.answers.event(sequence, text)))
        if reason is not None and request.done:
            frames.append(self._answer(request))

    def _answer(self, request: Request) -> dict:
        del self.requests[request.id]
        output = Output()
        if not request.stream:
            output.add_as_json(request.answers.body([row.sequence for row in request.rows], request.as_list))
        usage = {"prompt_tokens": sum(len(row.prompt_ids) for row in request.rows),
                 "generated_tokens": sum(len(row.sequence.ids) for row in request.rows)}
        return Response(request.id, output.for_item(0, 1), usage)

    def _drop(self, request: Request, reason: str) -> None:
        for row in request.rows:
            if not row.done:
                row.sequence.close(reason)
            self.scheduler.release(row)
        self.requests.pop(request.id, None)

    def _fail_all(self, code: int, message: str) -> None:
        frames = [Error(code, message, rid) for rid in self.requests]
        for request in list(self.requests.values()):
            self._drop(request, "cancelled")
        self.relay.send_frames(frames)

    # --- intake thread --------------------------------------------------------------------------
    def _intake(self) -> None:
        relay = self.relay
        while True:
            with relay.cond:
                while not relay.pending and not self.stopping:
                    relay.cond.wait()
                if self.stopping:
                    return
                rid, frame = relay.pending.popitem(last=False)
                self.in_intake.add(rid)
            try:
                request = self._admit(rid, frame)
            except Exception:  # noqa: BLE001 - this thread must outlive any one request, or every later one hangs
                log.exception("request %d could not be admitted", rid)
                message = "the engine failed to prepare this request; see the server log"
                self.relay.send_frames([Response(rid, Output().error(message, code=500, message=message).for_item(0, 1))])
                request = None
            with relay.cond:
                self.in_intake.discard(rid)
                if request is not None:
                    self.inbox.append(request)
                relay.cond.notify_all()

    def _admit(self, rid: int, frame: RequestFrame) -> Request | None:
        """Parse and tokenise one request; a bad one is answered here (422) and never reaches a step."""
        item = Input({**frame.input["properties"], **self.engine.properties}, frame.input["content"])
        try:
            body = parse_request(item)
            prompts, ids = tokenize(self.intake_tokenizer, body, self.engine.max_len)
            grammar = grammar_for(self.intake_tokenizer, body, self.engine.eos)
        except (ValidationError, ValueError, RequestError) as exc:  # UnicodeDecodeError is a ValueError
            message, code = str(exc), getattr(exc, "code", 422)
            self.relay.send_frames([Response(rid, Output().error(message, code=code, message=message).for_item(0, 1))])
            return None
        params = body.parameters
        as_list = body.as_list
        request = Request(rid, params, stream=wants_stream(item, body) and not as_list, as_list=as_list,
                          deadline=time.monotonic() + self.engine.settings.predict_timeout,
                          answers=Answers(output_format(item), params, self.engine.tokenizer))
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        for index, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
            generator = row_seed = None
            if params.sampling:
                row_seed = (seed + index) % (MAX_SEED + 1)
                generator = torch.Generator(device=self.engine.device).manual_seed(row_seed)
            sequence = Sequence(self.engine.tokenizer, prompt, len(prompt_ids), params, seed=row_seed,
                                constraint=grammar.constraint() if grammar else None)
            request.rows.append(Row(request, prompt_ids, sequence, generator))
        return request


def prompt_details(tokenizer, row: Row) -> list[Token]:
    """The prompt's tokens with the log-probability of each given the ones before it (the first has none: null)."""
    ids = row.prompt_ids
    text = token_text(tokenizer)
    return [Token(id=ids[0], text=text(ids[0]), log_prob=None)] + [
        Token(id=t, text=text(t), log_prob=lp) for t, lp in zip(ids[1:], row.prompt_log_probs)]
