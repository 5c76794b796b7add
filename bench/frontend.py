"""The front end's own cost (issue 7): requests/s of tpserve with `handlers.echo` at TP=2 against a bare aiohttp
app answering the same POST (bench/bare_app.py), side by side in one run, plus the p50 latency at one connection
and the chunks/s of one long stream (bench/chunks.py).

    python -m bench.frontend                        # wrk if installed, else the Python load generator below
    python -m bench.frontend --tool python --rounds 3 --batch-size 1 --batch-size 32

Each round measures the bare app and then every tpserve model back to back, in short runs, so a box whose load
drifts (other people's test runs) shifts both sides of a ratio alike: the share of bare is the median of the
rounds' own ratios. Each run also records the CPU seconds per request of the bare app, of tpserve's front end and
of its ranks (with mpirun), which a busy box inflates less than it moves requests/s. Prints Markdown rows for
BENCHMARKS.md and writes the raw numbers as JSON with --out.
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from tests.server import ROOT, Server, free_port

BODY = b"hello"
WRK_SCRIPT = 'wrk.method = "POST"\nwrk.body = "hello"\nwrk.headers["Content-Type"] = "text/plain"\n'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per many-connection measurement")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, action="append", help="tpserve batch_size (repeatable; "
                        "default 1); batch_size > 1 runs with max_batch_delay=1")
    parser.add_argument("--chunks", type=int, default=200_000, help="chunks in the one-stream measurement (0: skip)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "python")
    batch_sizes = args.batch_size or [1]
    load = Wrk() if tool == "wrk" else PythonLoad()
    report = {"commit": commit(), "tool": tool, "cores": os.cpu_count(), "tp": args.tp,
              "connections": args.connections, "duration_s": args.duration, "load_before": os.getloadavg(),
              "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        names = {}
        for size in batch_sizes:
            names[size] = f"echo_b{size}"
            props = {"engine": "DeepSpeed", "option.tensor_parallel_degree": str(args.tp),
                     "option.entryPoint": "handlers.echo", "batch_size": str(size)}
            if size > 1:
                props["max_batch_delay"] = "1"
            write_model(store / names[size], props)
        if args.chunks:
            write_model(store / "chunks", {"engine": "DeepSpeed", "option.tensor_parallel_degree": str(args.tp),
                                           "option.entryPoint": "bench.chunks"})
        server = Server(["--model-store", str(store), "--no-access-log"], Path(tmp) / "server.log")
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, "-m", "bench.bare_app", "--port", str(bare_port)], cwd=ROOT)
        try:
            models = server.wait_for_models()
            failed = {name: m.get("error") for name, m in models.items() if m["state"] != "READY"}
            if failed:
                raise SystemExit(f"models failed to load: {failed}\n{server.log_tail()}")
            wait_for_port(bare_port)
            bare_url = f"http://127.0.0.1:{bare_port}/predictions/echo"
            urls = {size: server.url(f"/predictions/{name}") for size, name in names.items()}
            for url in [bare_url, *urls.values()]:  # warm-up: first requests import and allocate
                load.run(url, connections=args.connections, duration=1.0)
            bare_procs = {"server": [psutil.Process(bare.pid)]}
            tpserve_procs = {"front end": [psutil.Process(server.process.pid)],
                             "ranks": [p for p in server.descendants() if "serving.namespace" not in " ".join(p.cmdline())]}

            def measure(url: str, procs: dict, connections: int, duration: float) -> dict:
                before = cpu_seconds(procs)
                result = load.run(url, connections, duration)
                after = cpu_seconds(procs)
                result["cpu_us_per_request"] = {name: (after[name] - before[name]) / max(1, result["requests"]) * 1e6
                                                for name in procs}
                return result

            for index in range(args.rounds):
                row = {"bare": measure(bare_url, bare_procs, args.connections, args.duration)}
                for size, url in urls.items():
                    row[f"tpserve_b{size}"] = measure(url, tpserve_procs, args.connections, args.duration)
                row["bare_c1"] = measure(bare_url, bare_procs, 1, args.duration / 2)
                for size, url in urls.items():
                    row[f"tpserve_b{size}_c1"] = measure(url, tpserve_procs, 1, args.duration / 2)
                report["rounds"].append(row)
                print(f"round {index + 1}: " + ", ".join(f"{k} {v['rps']:,.0f} req/s p50 {v['p50_ms']:.2f} ms"
                                                         for k, v in row.items()), flush=True)
            if args.chunks:
                report["stream"] = [stream_rate(server.url("/predictions/chunks"), args.chunks) for _ in range(3)]
            if any(v["errors"] for r in report["rounds"] for v in r.values()):  # say why, before the log is gone
                report["server_log_errors"] = [line for line in server.log_tail(2000).splitlines()
                                               if " ERROR " in line or " WARNING tpserve.worker_group" in line][-40:]
        finally:
            server.stop()
            bare.terminate()
            bare.wait(10)
    report["load_after"] = os.getloadavg()
    print_summary(report, batch_sizes)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def print_summary(report: dict, batch_sizes: list[int]) -> None:
    rounds = report["rounds"]

    def median(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in rounds)

    def cpu(key: str) -> str:
        names = rounds[0][key]["cpu_us_per_request"]
        return " + ".join(f"{statistics.median(r[key]['cpu_us_per_request'][n] for r in rounds):.0f} ({n})"
                          for n in names)

    bare = median("bare", "rps")
    print(f"\ncommit {report['commit']}, {report['tool']}, {report['connections']} connections, "
          f"{report['duration_s']:g} s each, {len(rounds)} rounds, load average {report['load_before'][0]:.1f} "
          f"before / {report['load_after'][0]:.1f} after\n")
    print(f"| server | {report['connections']} connections, req/s | share of bare (median of the rounds' ratios) | "
          f"1 connection, p50 | CPU us per request at {report['connections']} connections |")
    print("|---|---|---|---|---|")
    print(f"| bare aiohttp | {bare:,.0f} | - | {median('bare_c1', 'p50_ms'):.2f} ms | {cpu('bare')} |")
    for size in batch_sizes:
        key = f"tpserve_b{size}"
        shares = [r[key]["rps"] / r["bare"]["rps"] for r in rounds]
        listed = ", ".join(f"{share:.0%}" for share in shares)
        print(f"| tpserve, batch_size={size} | {median(key, 'rps'):,.0f} | {statistics.median(shares):.0%} "
              f"(rounds: {listed}) | {median(key + '_c1', 'p50_ms'):.2f} ms | {cpu(key)} |")
    errors = {k: v["errors"] for r in rounds for k, v in r.items() if v["errors"]}
    if errors:
        print(f"\nERRORS (non-2xx or socket errors): {errors}")
        print("\n".join(report.get("server_log_errors", [])))
    if report.get("stream"):
        rates = [s["chunks_per_s"] for s in report["stream"]]
        print(f"\none stream: {statistics.median(rates):,.0f} chunks/s (runs: "
              + ", ".join(f"{r:,.0f}" for r in rates) + ")")


def cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    totals = {}
    for name, group in procs.items():
        total = 0.0
        for proc in group:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        totals[name] = total
    return totals


def write_model(path: Path, properties: dict[str, str]) -> None:
    path.mkdir(parents=True)
    (path / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.post(f"http://127.0.0.1:{port}/predictions/echo", data=BODY, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing answers on port {port}")


def stream_rate(url: str, count: int) -> dict:
    """One request streaming `count` chunks of one line each: chunks per second from the first byte to the last."""
    with requests.post(url, data=str(count), headers={"Content-Type": "text/plain"}, stream=True,
                       timeout=300) as response:
        response.raise_for_status()
        lines, first = 0, None
        for data in response.iter_content(chunk_size=1 << 16):
            if first is None:
                first = time.perf_counter()
            lines += data.count(b"\n")
        seconds = time.perf_counter() - first
    if lines != count:
        raise RuntimeError(f"{lines} chunks arrived instead of {count}")
    return {"chunks": count, "seconds": seconds, "chunks_per_s": count / seconds}


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


class Wrk:
    """wrk (https://github.com/wg/wrk): one request shape, keep-alive connections, the latency distribution."""

    def __init__(self):
        self.script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        self.script.write(WRK_SCRIPT)
        self.script.close()

    def run(self, url: str, connections: int, duration: float) -> dict:
        threads = min(2, connections)
        out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                              "-s", self.script.name, url], capture_output=True, text=True)
        if out.returncode != 0 or "Requests/sec" not in out.stdout:
            raise RuntimeError(f"wrk failed ({out.returncode}) on {url}: {out.stdout[-500:]} {out.stderr[-500:]}")
        out = out.stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        count = int(re.search(r"(\d+) requests in", out).group(1))
        p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\b", out, re.M)
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
        errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if socket_errors:
            errors += sum(int(n) for n in socket_errors.groups())
        return {"rps": rps, "requests": count, "p50_ms": float(p50.group(1)) * scale, "errors": errors}


class PythonLoad:
    """The project's own load generator, where wrk is missing: asyncio connections with keep-alive, each sending the
    next POST when the last answer is in. A Python client costs more CPU than wrk, so on a small box it caps both
    sides of the comparison; prefer wrk for numbers to publish."""

    def run(self, url: str, connections: int, duration: float) -> dict:
        return asyncio.run(self._run(url, connections, duration))

    async def _run(self, url: str, connections: int, duration: float) -> dict:
        match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
        latencies: list[float] = []
        errors = [0]
        stop = time.perf_counter() + duration

        async def client():
            reader, writer = await asyncio.open_connection(host, port)
            try:
                while time.perf_counter() < stop:
                    sent = time.perf_counter()
                    writer.write(head)
                    status = await reader.readline()
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    await reader.readexactly(length)
                    latencies.append(time.perf_counter() - sent)
                    if not status.startswith(b"HTTP/1.1 2"):
                        errors[0] += 1
            finally:
                writer.close()

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - began
        return {"rps": len(latencies) / elapsed, "requests": len(latencies),
                "p50_ms": statistics.median(latencies) * 1000, "errors": errors[0]}


if __name__ == "__main__":
    main()
