"""Captured steps: CUDA graphs of the model's forward, replayed instead of running it eagerly.

An eager step of a 7B model spends most of its time launching kernels from Python (hundreds per layer, and at
TP > 1 two all-reduces per layer). A graph records one step's kernels once, all-reduces included, and replays
them with one launch. A graph replays fixed shapes and fixed addresses, so:
- each graph has its own input buffers (runner.StepTensors) that a step refills in place, and reads nothing
  from the host: attention takes its shape from device tensors (attention.py, the flash path);
- a step is padded up to the smallest graph that holds it (`Buckets.pick`). Decode steps of n rows run in
  the graph for B >= n rows, the extra rows decoding a dummy token in the cache's scratch slot. Steps with
  prompt tokens run in a graph for T >= tokens packed tokens and every slot's sequence: the extra tokens form
  dummy chunks in the scratch slot, and the unused sequences are empty.
Padding only adds rows whose results nobody reads, so a padded step's kept logits are the unpadded step's
(tests/engine check this token for token on the CPU, where the padded plan runs eagerly).

What a graph records is the compiled forward when the runner has one (runner.compile, `option.torch_compile`):
Inductor fuses each layer's small kernels first, then capture removes the launches. Steps no graph holds (more kept logits than rows, as with prompt log-probabilities,
or more tokens than the largest graph) run eagerly.
"""
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch

from serving.engine import gemv
from serving.engine.kv_cache import SlotCache
from serving.engine.plan import Chunk, StepPlan
from serving.engine.runner import Feed, ModelRunner, Packed, StepTensors, pack

log = logging.getLogger("tpserve.engine.graphs")
DECODE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# prompt-step buckets: steps of 1-4k tokens are compute-bound, so every padded token costs its full share; over
# 256 the buckets are at most 1.5x apart, and mostly 1.25x (2x apart, the 64-stream workload padded 15% of its prompt
# tokens; 1.5x apart, 9%)
PREFILL_TOKENS = (32, 64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144,
                  8192)
# Decode graphs of more rows than the streaming projections take (gemv.py) are captured with cuBLASLt's kernels,
# prompt graphs with cuBLAS's: at 32-128 rows cuBLASLt read down_proj's weights 11-25% faster and the others as
# fast, while cuBLAS ran the 4,096-token prompt matmuls 4-12% faster (one H200, bench.gemv --layouts and
# bench.matmul). A graph keeps the kernels chosen when it was captured. TPSERVE_DECODE_BLAS=cublas: cuBLAS for
# every graph (A/B benchmarks).
DECODE_BLAS = os.environ.get("TPSERVE_DECODE_BLAS", "cublaslt").lower()


@dataclass(frozen=True)
class Shape:
    """One graph: `tokens` packed tokens in `seqs` sequences, keeping `keep` logits rows; `prefill` graphs take
    prompt chunks (query lengths up to `tokens`), decode graphs one token per sequence."""

    tokens: int
    seqs: int
    keep: int
    prefill: bool

    def max_q(self, max_len: int) -> int:
        """The bound on every sequence's query tokens the graph's attention is launched with (flash's kernel has
        a block of queries per 128 of it, for every sequence: with 129 sequences and 4,096 tokens, a bound of the
        packed length made the layer's attention 2x slower than the slot length, bench.attention --prefill). No
        chunk is longer than a slot: prompts are shorter (intake.py), dummy chunks are cut at max_len."""
        return min(self.tokens, max_len) if self.prefill else 1


class Buckets:
    """The graphs an engine captures, from its slot count and prefill budget, and which one runs a plan."""

    def __init__(self, slots: int, prefill_tokens: int, max_len: int):
        self.max_len = max_len
        rows = [b for b in DECODE_ROWS if b < slots] + [slots]
        self.decode = [Shape(b, b, b, False) for b in rows]
        largest = slots + prefill_tokens  # every row decoding and a full prefill budget
        sizes = [t for t in PREFILL_TOKENS if t < largest] + [largest]
        # every row a sequence, plus the dummy chunks that pad the tokens (each at most max_len long)
        self.prefill = [Shape(t, slots + -(-t // max_len), slots + 1, True) for t in sizes]

    @property
    def shapes(self) -> list[Shape]:
        return self.decode + self.prefill

    def pick(self, plan: StepPlan) -> Shape | None:
        """The smallest graph that holds the plan, or None (run it eagerly)."""
        if not plan.prefill:
            return next((s for s in self.decode if s.seqs >= len(plan.decode_slots)), None)
        seqs = len(plan.decode_slots) + len(plan.prefill)
        return next((s for s in self.prefill if s.tokens >= plan.n_tokens and s.keep >= len(plan.keep)
                     and s.seqs - -(-(s.tokens - plan.n_tokens) // self.max_len) >= seqs), None)


@contextlib.contextmanager
def blas_library(name: str):
    """torch's preferred BLAS library set to `name` inside the block (where this torch has it), then restored."""
    previous = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(name)
    except RuntimeError:  # a build without cuBLASLt: keep the library there is
        pass
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def pad(plan: StepPlan, shape: Shape, scratch: int, max_len: int) -> StepPlan:
    """The plan grown to the graph's shape with rows nobody reads, all in the scratch slot."""
    keep = plan.keep + [0] * (shape.keep - len(plan.keep))
    if not shape.prefill:
        extra = shape.seqs - len(plan.decode_slots)
        positions = [i % max_len for i in range(extra)]
        return StepPlan(plan.decode_slots + [scratch] * extra, plan.decode_tokens + [0] * extra,
                        plan.decode_positions + positions, [], keep, plan.fed + [-1] * extra if plan.fed else [])
    chunks = list(plan.prefill)
    extra = shape.tokens - plan.n_tokens
    while extra:
        length = min(extra, max_len)
        chunks.append(Chunk(scratch, 0, [0] * length))
        extra -= length
    empty = shape.seqs - len(plan.decode_slots) - len(chunks)
    chunks += [Chunk(scratch, 0, []) for _ in range(empty)]
    return StepPlan(plan.decode_slots, plan.decode_tokens, plan.decode_positions, chunks, keep, plan.fed)


class StepGraphs:
    """The captured graphs of one engine, over its runner (and so its model and cache). Not captured (CPUs, in
    tests), it runs each padded step eagerly: the same padding, bucket choice and kept rows, without CUDA."""

    def __init__(self, runner: ModelRunner, buckets: Buckets):
        self.runner = runner
        self.cache: SlotCache = runner.cache
        self.buckets = buckets
        self.graphs: dict[Shape, tuple[torch.cuda.CUDAGraph, StepTensors, torch.Tensor]] = {}

    def capture(self) -> float:
        """Capture every bucket's graph, the largest first (later ones reuse its memory). Seconds taken."""
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for shape in sorted(self.buckets.shapes, key=lambda s: (s.tokens, s.seqs), reverse=True):
            inputs = StepTensors(self._packed(StepPlan(), shape), self.runner.device)
            wide_decode = not shape.prefill and shape.seqs > gemv.MAX_ROWS
            with torch.inference_mode(), blas_library(DECODE_BLAS if wide_decode else "cublas"):
                # warm-up outside the capture: kernels pick their algorithms, the compiler compiles
                self.runner.forward(inputs, None, compiled=True)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = self.runner.forward(inputs, None, compiled=True)
            self.graphs[shape] = (graph, inputs, logits)
        torch.cuda.synchronize()
        return time.monotonic() - started

    @torch.inference_mode()
    def run(self, plan: StepPlan, feed: Feed | None = None) -> torch.Tensor | None:
        """The plan's kept logits ([len(plan.keep), vocab] float32) from its graph, or None if none holds it.
        `feed`: the decode tokens that are on the device (runner.Feed)."""
        shape = self.buckets.pick(plan)
        if shape is None:
            return None
        if self.graphs:
            graph, inputs, logits = self.graphs[shape]
            inputs.fill(self._packed(plan, shape))
            inputs.take(feed)
            graph.replay()
        else:
            padded = pad(plan, shape, self.cache.scratch, self.cache.max_len)
            inputs = StepTensors(self._packed(plan, shape), self.runner.device)
            inputs.take(feed)
            logits = self.runner.forward(inputs, None if self.runner.varlen else self.runner.slot_rows(padded),
                                         compiled=True)
        return logits[0, :len(plan.keep)].float()

    def _packed(self, plan: StepPlan, shape: Shape) -> Packed:
        packed = pack(pad(plan, shape, self.cache.scratch, self.cache.max_len), self.cache.max_len)
        packed.max_q = shape.max_q(self.cache.max_len)
        return packed
