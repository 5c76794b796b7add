"""Streamed requests against a running server over HTTP, the way vLLM's benchmark_serving drives one: a fixed set
of requests, at most `concurrency` in flight, optionally released at a Poisson rate. Each jsonlines line of
/predictions' stream is one token; its arrival time is recorded.

The load generator runs in bench.serve's process, which holds torch and a tokenizer (~300,000 objects): a full
collection of Python's garbage collector in the middle of a burst stopped the client for 240 ms on the 2-core box,
time that is the client's and not the server's. So `client_gc` freezes the objects that exist before a level
(gc.freeze: later collections skip them) and counts the collections during it, which a report shows beside the
level."""
import asyncio
import contextlib
import gc
import random
import time

import aiohttp

from bench.metrics import Timing


async def run_load(url: str, prompts: list[str], output_len: int, concurrency: int,
                   rate: float | None = None, seed: int = 0) -> tuple[list[Timing], float]:
    """All prompts through `url`; returns their timings and the wall time from the first send to the last token."""
    gate = asyncio.Semaphore(concurrency)
    arrivals_rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(session, url, prompt, output_len, gate)))
            if rate:
                await asyncio.sleep(arrivals_rng.expovariate(rate))
        timings = await asyncio.gather(*tasks)
    ends = [t.arrivals[-1] for t in timings if t.arrivals]
    return timings, (max(ends) if ends else time.perf_counter()) - started


@contextlib.contextmanager
def client_gc():
    """Collect and freeze what exists now; yields {"collections", "ms", "longest_ms"} of the collections inside."""
    gc.collect()
    gc.freeze()
    stats = {"collections": 0, "ms": 0.0, "longest_ms": 0.0}
    started = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
            return
        ms = (time.perf_counter() - started.pop()) * 1000
        stats.update(collections=stats["collections"] + 1, ms=stats["ms"] + ms, longest_ms=max(stats["longest_ms"], ms))
    gc.callbacks.append(count)
    try:
        yield stats
    finally:
        gc.callbacks.remove(count)
        gc.unfreeze()


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, output_len: int,
               gate: asyncio.Semaphore) -> Timing:
    body = {"inputs": prompt, "stream": True,
            "parameters": {"max_new_tokens": output_len, "min_new_tokens": output_len}}
    async with gate:
        timing = Timing(time.perf_counter())
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    timing.error = f"{response.status}: {(await response.text())[:200]}"
                    return timing
                async for line in response.content:
                    if line.strip():
                        timing.arrivals.append(time.perf_counter())
        except aiohttp.ClientError as exc:
            timing.error = f"{type(exc).__name__}: {exc}"
        if not timing.error and len(timing.arrivals) != output_len:
            timing.error = f"{len(timing.arrivals)} tokens instead of {output_len}"
        return timing
