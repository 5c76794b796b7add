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
