"""The serving benchmark's arithmetic: per-request latencies from chunk arrival times, their percentiles, and the
workload's roofline bound. Pure functions, unit-tested (tests/unit/test_bench_metrics.py)."""
import math
from dataclasses import dataclass, field


@dataclass
class Timing:
    """One streamed request: when it was sent and when each token arrived (seconds, one clock)."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.arrivals[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for a one-token answer."""
        n = len(self.arrivals)
        return (self.arrivals[-1] - self.arrivals[0]) / (n - 1) if n > 1 else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summarize(timings: list[Timing], duration: float) -> dict:
    """Latency percentiles in ms, throughput over `duration` (first send to last arrival)."""
    done = [t for t in timings if t.error is None and t.arrivals]
    tokens = sum(len(t.arrivals) for t in done)
    row = {"requests": len(timings), "errors": len(timings) - len(done), "duration_s": duration,
           "output_tokens": tokens, "requests_per_s": len(done) / duration if duration else math.nan,
           "output_tokens_per_s": tokens / duration if duration else math.nan}
    series = {"ttft": [t.ttft for t in done], "tpot": [t.tpot for t in done if t.tpot is not None],
              "itl": [g for t in done for g in t.gaps], "e2e": [t.e2e for t in done]}
    for name, values in series.items():
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = percentile(values, q) * 1000
    return row


@dataclass
class Hardware:
    """Measured on the card of the run: copy bandwidth (bytes/s, read + write) and dense fp16 matmul rate."""

    bandwidth: float
    flops: float


@dataclass
class Shape:
    weight_bytes: int  # every parameter, in the served dtype
    params: int
    kv_bytes_per_token: int  # keys and values of all layers, all heads


def floor_tpot(shape: Shape, hw: Hardware, tp: int = 1) -> float:
    """Seconds per token at batch 1 if each step only read the weights (each of `tp` cards reads its share)."""
    return shape.weight_bytes / (hw.bandwidth * tp)


def roofline_tokens_per_s(shape: Shape, hw: Hardware, prompt_lengths: list[int], output_len: int,
                          concurrency: int, tp: int = 1) -> float:
    """Output tokens/s if the work ran at the hardware's limits: requests in waves of `concurrency`, each decode
    step reading every weight once plus the live KV cache of its rows, each prompt costing 2 x params x tokens
    FLOPs. `tp` cards share the bytes and the FLOPs."""
    waves = math.ceil(len(prompt_lengths) / concurrency)
    steps = waves * output_len
    kv_tokens = sum(output_len * p + output_len * (output_len - 1) / 2 for p in prompt_lengths)
    decode_s = (steps * shape.weight_bytes + kv_tokens * shape.kv_bytes_per_token) / (hw.bandwidth * tp)
    prefill_s = 2 * shape.params * sum(prompt_lengths) / (hw.flops * tp)
    return len(prompt_lengths) * output_len / (decode_s + prefill_s)


def partings(reference: list[list[int]], margins: list[list[float]], other: list[list[int]]) -> list[dict | None]:
    """Where two paths' greedy tokens for the same prompts part: for each prompt None (equal), or the first token
    that differs and the reference's margin there (its top-1 minus top-2 log-probability, what the argmax stood
    on). A random-weight model has near-ties that any change of fp16 rounding flips; a parting at a wide margin
    would be a real difference."""
    out = []
    for ids, gaps, theirs in zip(reference, margins, other):
        at = next((i for i, (a, b) in enumerate(zip(ids, theirs)) if a != b), None)
        if at is None and len(ids) != len(theirs):
            at = min(len(ids), len(theirs))
        out.append(None if at is None else {"token": at, "margin": round(gaps[at], 4) if at < len(gaps) else None})
    return out


def timeline_summary(records: list[dict]) -> dict:
    """Rank 0's step timeline (serving/engine/timeline.py records, in order) summed up: the device's busy share
    between the first step's start and the last one's end, the gaps between steps (short ones are sampling and
    the token broadcast; long ones a device waiting for the host), the time by step kind, and the host's median
    time per phase, and the garbage collector's pauses in the loop's process. Without device times (CPU) only the
    host's part."""
    timed = [r for r in records if "gpu_ms" in r]
    host = {}
    for before, after in (("begin", "queued"), ("queued", "emitted"), ("emitted", "sampled")):
        spans = [r["host_ms"][after] - r["host_ms"][before] for r in records
                 if before in r["host_ms"] and after in r["host_ms"]]
        host[f"{before}_to_{after}_p50_ms"] = round(percentile(spans, 50), 3)
    out = {"steps": len(records), "host": host}
    collections = [pause for r in records for pause in r.get("gc", ())]  # [generation, ms]
    pauses = [ms for _, ms in collections]
    out["gc"] = {"collections": len(pauses), "ms": round(sum(pauses), 1), "longest_ms": round(max(pauses, default=0), 1),
                 "full": sum(1 for generation, _ in collections if generation == 2)}
    if records and "unix_ms" in records[0]:  # the device starts the first step as the host asks (it is idle then)
        first, last = records[0], records[-1]
        out["first_step_unix_ms"] = first["unix_ms"]
        out["last_step_end_unix_ms"] = first["unix_ms"] + (  # device times count from an earlier step's event
            timed[-1]["gpu_ms"][1] - timed[0]["gpu_ms"][0] if timed  # on a CPU the forward ends as it is queued
            else last["unix_ms"] - first["unix_ms"] + last["host_ms"]["queued"] - last["host_ms"]["begin"])
    if not timed:
        return out
    span = timed[-1]["gpu_ms"][1] - timed[0]["gpu_ms"][0]
    busy = sum(r["gpu_ms"][1] - r["gpu_ms"][0] for r in timed)
    gaps = sorted(((b["gpu_ms"][0] - a["gpu_ms"][1], a["kind"], b["kind"], a["gpu_ms"][1])
                   for a, b in zip(timed, timed[1:])), reverse=True)
    kinds: dict[str, dict] = {}
    for r in timed:
        entry = kinds.setdefault(r["kind"], {"steps": 0, "gpu_ms": 0.0, "tokens": 0, "padded_tokens": 0})
        entry["steps"] += 1
        entry["gpu_ms"] += r["gpu_ms"][1] - r["gpu_ms"][0]
        entry["tokens"] += r["tokens"]
        entry["padded_tokens"] += r["padded"]
    out.update({
        "span_ms": round(span, 1), "gpu_busy_share": round(busy / span, 3) if span else math.nan,
        "gaps": {"total_ms": round(sum(g[0] for g in gaps), 1),
                 "under_1ms_total_ms": round(sum(g[0] for g in gaps if g[0] < 1), 1),
                 "under_1ms_count": sum(1 for g in gaps if g[0] < 1),
                 "largest": [{"ms": round(g, 2), "after": a, "before": b, "at_ms": round(t)}
                             for g, a, b, t in gaps[:8]]},
        "by_kind": {kind: {**e, "gpu_ms": round(e["gpu_ms"], 1), "ms_per_step": round(e["gpu_ms"] / e["steps"], 2)}
                    for kind, e in sorted(kinds.items(), key=lambda kv: -kv[1]["gpu_ms"])}})
    return out
