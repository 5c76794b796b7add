"""The spine's numbers on this machine: time from `tpserve` start to ready, the time of one 50-token
request, streaming (time to first token, mean inter-token time) and idle CPU, for the SmolLM2 demo at a
given TP. Prints a Markdown table row per setting.

    python -m bench.spine --tp 2 --tp 1
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import requests

from tests.server import ROOT, Server

DEMO = ROOT / "model_store" / "smollm2" / "model"
PROMPT = "I'm very thirsty, I need"


def measure(tp: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "smollm2"
        model.mkdir()
        (model / "serving.properties").write_text(
            f"engine=DeepSpeed\noption.model_id={DEMO}\noption.tensor_parallel_degree={tp}\noption.dtype=fp32\n")
        server = Server(["-m", str(model)], Path(tmp) / "server.log")
        try:
            server.wait_for_models()
            ready = time.monotonic() - server.started
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 50, "min_new_tokens": 50, "details": True}}
            times = []
            for _ in range(repeats):
                started = time.monotonic()
                response = server.post("/predictions/smollm2", json=body)
                times.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
                assert response.json()["details"]["generated_tokens"] == 50
            ttft, itl = [], []
            for _ in range(repeats):
                first, gaps = stream_timings(server, {**body, "stream": True})
                ttft.append(first)
                itl.append(statistics.mean(gaps))
            procs = [psutil.Process(server.process.pid)] + server.descendants()
            before = sum(sum(p.cpu_times()[:2]) for p in procs)
            time.sleep(5)
            idle = (sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running()) - before) / 5
        finally:
            server.stop()
    return {"tp": tp, "ready_s": ready, "first_s": times[0], "median_s": statistics.median(times),
            "ms_per_token": statistics.median(times) / 50 * 1000, "idle_cpu": idle,
            "ttft_ms": statistics.median(ttft) * 1000, "itl_ms": statistics.median(itl) * 1000}


def stream_timings(server: Server, body: dict) -> tuple[float, list[float]]:
    """Seconds to the first streamed token, and the gaps between the following ones."""
    started = time.monotonic()
    arrivals = []
    with requests.post(server.url("/predictions/smollm2"), json=body, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 50, len(arrivals)
    return arrivals[0] - started, [b - a for a, b in zip(arrivals, arrivals[1:])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, action="append", help="tensor_parallel_degree (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [measure(tp, args.repeats) for tp in args.tp or [2]]
    print("| TP | start -> ready (s) | first 50-token request (s) | median of %d (s) | ms/token | "
          "streamed: time to first token (ms) | mean inter-token (ms) | idle CPU (cores) |" % args.repeats)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['ready_s']:.1f} | {r['first_s']:.2f} | {r['median_s']:.2f} | "
              f"{r['ms_per_token']:.0f} | {r['ttft_ms']:.0f} | {r['itl_ms']:.1f} | {r['idle_cpu']:.3f} |")


if __name__ == "__main__":
    main()
