"""The serving benchmark (`make bench`): tpserve over HTTP at each TP and concurrency, two in-process baselines
on the same card and requests, and the workload's roofline bound beside each row.

    python -m bench.serve --model-dir M [--tp 1 --tp 2] [--concurrency 1 --concurrency 64] \
        [--requests 64] [--prompt-len 32:512] [--output-len 128] [--rate R] [--property key=value ...] \
        [--probe 512:16 ...] [--eager] [--baselines] [--timeline] [--out bench/reports/NAME.json]
    python -m bench.serve --url http://host:port/predictions/m ...     # a server that is already running

`--probe P:O` adds a row per TP of 8 requests one at a time, P prompt tokens and O output tokens each (batch-1
time per token, time to first token of a long prompt). `--eager` also serves each TP with
option.enable_cuda_graph=false: its greedy tokens are compared with the captured path's (`graph_equals_eager`), and
its probes and first concurrency level are measured as "tpserve eager", beside the ready time of both. Greedy
tokens come with each token's margin (top-1 minus top-2 log-probability), and `partings` names where each server's
tokens part from TP=1's and from the eager path's and on what margin: a near-tie that fp16 rounding flips, or a
real difference.
`--timeline` has each server's rank 0 record its step timeline (serving/engine/timeline.py) and adds its summary to
each row: the GPU's busy share, the gaps between steps, the time by step kind.

Prompts are random sequences of common words, one token each with the model's tokenizer (so a prompt of N words
is N tokens), with ids inside the model's vocabulary. Output lengths are forced (min_new_tokens). Prints one
Markdown table; the JSON report has `card`, `commit`, `model` and `rows` (see bench/metrics.py for the columns).
"""
import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.load import client_gc, run_load
from bench.metrics import (Hardware, Shape, floor_tpot, partings, roofline_tokens_per_s, summarize,
                           timeline_summary)
from serving.engine.timeline import ENV as TIMELINE

WORDS = ("the of and to in is was for on that with as by at from his her he she it they we you this be are "
         "have had not but what all were when there can an your which their said if will do each about how up out "
         "them then many some so these would other into has more two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much go good new write our me man too any day same right "
         "look think also around another came come work three word must because does part even place well such "
         "here take why things help put years different away again off went old number great tell men say small "
         "every found still between name should home big give air line set own under read last never us left end "
         "along while might next sound below saw something thought both few those always looked show large often "
         "together asked house world going want school important until form food keep children feet land side "
         "without boy once animals life enough took sometimes four head above kind began almost live page got "
         "earth need far hand high year mother light parts country father let night following picture being study "
         "second eyes soon times story boys since white days ever paper hard near sentence better best across "
         "during today others however sure means knew try told young miles sun ways thing whole hear example heard "
         "several change answer room sea against top turned learn point city play toward five using himself usually").split()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face model folder to serve")
    parser.add_argument("--url", help="drive this running server's /predictions/<model> instead")
    parser.add_argument("--tp", type=int, action="append", help="tensor_parallel_degree values (default 1)")
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1 8 32 64 128")
    parser.add_argument("--requests", type=int, help="requests per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--prompt-len", default="32:512", help="N, or LOW:HIGH for uniform lengths")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rate", type=float, help="Poisson arrival rate (requests/s); default: all at once")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--property", action="append", default=[], help="extra serving.properties key=value")
    parser.add_argument("--baselines", action="store_true", help="also run the in-process transformers baselines")
    parser.add_argument("--probe", action="append", default=[], help="PROMPT:OUTPUT tokens, one request at a time")
    parser.add_argument("--eager", action="store_true", help="also serve with option.enable_cuda_graph=false")
    parser.add_argument("--restart", action="store_true",
                        help="after each TP's run, time a second start (compile caches warm) and a plain start "
                             "(option.enable_cuda_graph=false) of the same model")
    parser.add_argument("--only-baselines", action="store_true", help="run the baselines and no server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeline", action="store_true",
                        help="servers started here record rank 0's step timeline; each row gets its summary")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if not args.url and not args.model_dir:
        parser.error("give --model-dir or --url")
    if args.url and args.timeline:
        parser.error("--timeline needs servers started here (--model-dir)")
    levels = args.concurrency or [1, 8, 32, 64, 128]
    if args.timeline:  # read by the ranks of every server started below (serving/engine/timeline.py)
        os.environ[TIMELINE] = str(Path(tempfile.mkdtemp()) / "timeline.jsonl")
    tokenizer_dir = args.model_dir or None
    report = {"card": card(), "commit": commit(), "model": describe_model(args.model_dir, args.dtype),
              "settings": {"prompt_len": args.prompt_len, "output_len": args.output_len, "rate": args.rate,
                           "properties": args.property, "dtype": args.dtype}, "rows": []}
    hw = measure_hardware() if torch.cuda.is_available() else None
    if hw:
        report["hardware"] = {"copy_bandwidth_GBps": hw.bandwidth / 1e9, "fp16_matmul_TFLOPs": hw.flops / 1e12}
    workloads = {c: make_prompts(tokenizer_dir, requests_for(c, args.requests), args.prompt_len, args.seed + c)
                 for c in levels}
    rows = report["rows"]
    if args.url:
        for c in levels:
            rows.append(measure(args.url, "tpserve", None, c, workloads[c], args, hw, report["model"]))
    else:
        probes = {p: make_prompts(tokenizer_dir, 8, p.split(":")[0], args.seed) for p in args.probe}
        for tp in [] if args.only_baselines else args.tp or [1]:
            for eager in ([False, True] if args.eager else [False]):
                path = "tpserve eager" if eager else "tpserve"
                try:
                    measure_server(args, tp, path, eager, levels, workloads, probes, hw, report)
                except Exception as exc:  # noqa: BLE001 - one server that fails is reported; the others still run
                    print(f"{path} TP={tp} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    report.setdefault("servers", {})[f"{path} TP={tp}"] = {"error": f"{type(exc).__name__}: {exc}"}
        greedy = report.get("greedy_ids", {})
        report["greedy_ids_equal"] = len({json.dumps(ids) for ids in greedy.values()}) <= 1
        report["graph_equals_eager"] = {
            f"TP={tp}": f"tpserve TP={tp}" in greedy and greedy[f"tpserve TP={tp}"] == greedy.get(f"tpserve eager TP={tp}")
            for tp in args.tp or [1]} if args.eager else None
        report["partings"] = greedy_partings(greedy, report.get("greedy_margins", {}))
        if args.baselines or args.only_baselines:
            rows += run_baselines(args, levels, workloads, hw, report["model"])
    print_table(report)
    if report.get("greedy_ids"):
        print(f"greedy ids ({', '.join(report['greedy_ids'])}) equal: {report['greedy_ids_equal']}")
        print(f"captured path's greedy ids equal the eager path's: {report['graph_equals_eager']}")
        for name, server in report.get("servers", {}).items():
            if "error" in server:
                print(f"{name}: {server['error']}")
            else:
                print(f"{name}: ready in {server['ready_s']:.1f} s, GPU memory {server['gpu_memory_mib']} MiB"
                      + (f"; second start {server['second_start_ready_s']:.1f} s, plain start "
                         f"{server['plain_start_ready_s']:.1f} s" if "second_start_ready_s" in server else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


def measure_server(args, tp: int, path: str, eager: bool, levels, workloads, probes, hw, report) -> None:
    rows = report["rows"]
    extra = ["option.enable_cuda_graph=false"] if eager else []
    with served(args.model_dir, tp, args, extra) as (url, server):
        report.setdefault("servers", {})[f"{path} TP={tp}"] = server
        name = f"{path} TP={tp}"
        report.setdefault("greedy_ids", {})[name], report.setdefault("greedy_margins", {})[name] = greedy_ids(
            url, workloads[levels[0]], 4)
        for probe, workload in probes.items():
            row = measure(url, f"{path} probe {probe}", tp, 1, workload[:4] if eager else workload, args, hw,
                          report["model"], int(probe.split(":")[1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        for c in [] if eager else levels:
            rows.append(measure(url, path, tp, c, workloads[c], args, hw, report["model"]))
            print(json.dumps(rows[-1]), flush=True)
    if args.restart and not eager:  # startup targets: a second start, and the plain load it is held against
        starts = report["servers"][f"{path} TP={tp}"]
        for key, extra in (("second_start", []), ("plain_start", ["option.enable_cuda_graph=false"])):
            with served(args.model_dir, tp, args, extra) as (_, server):
                starts[f"{key}_ready_s"] = server["ready_s"]
                starts[f"{key}_log"] = server["startup_log"]


def requests_for(concurrency: int, requested: int | None) -> int:
    return requested or max(8, 2 * concurrency)


def make_prompts(tokenizer_dir, count: int, lengths: str, seed: int) -> list[tuple[str, int]]:
    """`count` prompts as (text, tokens); with a tokenizer, each word is checked to be one token in the vocabulary."""
    rng = random.Random(seed)
    words = list(WORDS)
    if tokenizer_dir:
        from transformers import AutoConfig, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        vocab = getattr(AutoConfig.from_pretrained(tokenizer_dir), "vocab_size", None) or len(tokenizer)
        words = [w for w in words if len(ids := tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
                 and ids[0] < vocab]
    low, _, high = lengths.partition(":")
    low, high = int(low), int(high or low)
    prompts = []
    for _ in range(count):
        n = rng.randint(low, high)
        prompts.append(("".join(" " + rng.choice(words) for _ in range(n)), n))
    return prompts


def measure(url: str, path: str, tp: int | None, concurrency: int, workload, args, hw, model,
            output_len: int | None = None) -> dict:
    output_len = output_len or args.output_len
    texts = [text for text, _ in workload]
    asyncio.run(run_load(url, texts[:1], 2, 1))  # warm-up
    timeline = Path(os.environ[TIMELINE]) if args.timeline else None
    if timeline:
        written(timeline).unlink(missing_ok=True)
    with client_gc() as collections:
        sent = time.time() * 1000
        timings, duration = asyncio.run(run_load(url, texts, output_len, concurrency, args.rate, args.seed))
    row = {"path": path, "tp": tp, "concurrency": concurrency, **summarize(timings, duration),
           "client_gc": {key: round(value, 1) for key, value in collections.items()}}
    if timeline:
        row["timeline"] = summary = timeline_summary(
            [json.loads(line) for line in written(timeline).read_text().splitlines()])
        if "first_step_unix_ms" in summary:  # the client's time outside the device's: requests in and tokens out
            summary["first_send_to_first_step_ms"] = round(summary["first_step_unix_ms"] - sent, 1)
            summary["last_step_to_last_token_ms"] = round(sent + duration * 1000 - summary["last_step_end_unix_ms"], 1)
    first_error = next((t.error for t in timings if t.error), None)
    if first_error:
        row["first_error"] = first_error
    return add_bounds(row, hw, model, [n for _, n in workload], output_len, concurrency, tp or 1)


def written(path: Path, settle: float = 0.5, limit: float = 30) -> Path:
    """`path` once the server's loop has gone idle and appended its last steps: unchanged for `settle` seconds."""
    deadline, last = time.monotonic() + limit, None
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else None
        if size is not None and size == last:
            break
        last = size
        time.sleep(settle)
    return path


def greedy_ids(url: str, workload, count: int = 2, tokens: int = 32) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy token ids of the first prompts, to compare across TP degrees and paths, and each token's margin
    (top-1 minus top-2 log-probability): where two paths part, it tells a near-tie from a real difference."""
    import requests

    ids, margins = [], []
    for text, _ in workload[:count]:
        body = {"inputs": text, "parameters": {"max_new_tokens": tokens, "min_new_tokens": tokens, "details": True,
                                               "top_n_tokens": 2}}
        response = requests.post(url, json=body, timeout=600)
        response.raise_for_status()
        details = response.json()["details"]
        ids.append([t["id"] for t in details["tokens"]])
        margins.append([top[0]["log_prob"] - top[1]["log_prob"] for top in details.get("top_tokens") or ()])
    return ids, margins


def greedy_partings(greedy: dict, margins: dict) -> dict:
    """Where each server's greedy ids part from those of the same path at TP=1, and from the eager path's at the
    same TP, with the reference's margin there (bench.metrics.partings)."""
    out = {}
    for name, ids in greedy.items():
        path, _, tp = name.rpartition(" TP=")
        references = [f"{path} TP=1"] if tp != "1" else []
        if path == "tpserve":
            references.append(f"tpserve eager TP={tp}")
        for reference in references:
            if reference in greedy:
                out[f"{name} against {reference}"] = partings(greedy[reference], margins[reference], ids)
    return out


def add_bounds(row: dict, hw: Hardware | None, model: dict, lengths: list[int], output_len: int,
               concurrency: int, tp: int) -> dict:
    if hw and model.get("weight_bytes"):
        shape = Shape(model["weight_bytes"], model["params"], model["kv_bytes_per_token"])
        row["roofline_tokens_per_s"] = roofline_tokens_per_s(shape, hw, lengths, output_len, concurrency, tp)
        row["floor_tpot_ms"] = floor_tpot(shape, hw, tp) * 1000
        row["share_of_roofline"] = row["output_tokens_per_s"] / row["roofline_tokens_per_s"]
    return row


class served:
    """tpserve serving `model_dir` at `tp` for the duration of a `with` block; yields its predictions URL and
    what it took (seconds to ready, GPU memory in use per card)."""

    def __init__(self, model_dir: Path, tp: int, args, extra: list[str] = ()):
        self.model_dir, self.tp, self.args, self.extra = model_dir, tp, args, list(extra)

    def __enter__(self) -> str:
        from tests.server import Server

        self.tmp = tempfile.TemporaryDirectory()
        store = Path(self.tmp.name) / "bench"
        store.mkdir()
        lines = ["engine=DeepSpeed", f"option.model_id={self.model_dir.resolve()}",
                 f"option.tensor_parallel_degree={self.tp}", f"option.dtype={self.args.dtype}",
                 "option.predict_timeout=1200", "job_queue_size=100000", *self.args.property, *self.extra]
        (store / "serving.properties").write_text("\n".join(lines) + "\n")
        self.log = Path(self.tmp.name) / "server.log"
        self.server = Server(["-m", str(store)], self.log)
        state = self.server.wait_for_models(timeout=900)["bench"]
        if state["state"] != "READY":
            raise RuntimeError(f"tpserve failed to load: {state['error']}\n{self.server.log_tail()}")
        ready = time.monotonic() - self.server.started
        print(f"tpserve TP={self.tp} {' '.join(self.extra)} ready in {ready:.1f} s", flush=True)
        memory = gpu_memory_mib() if torch.cuda.is_available() else []
        return self.server.url("/predictions/bench"), {"ready_s": ready, "gpu_memory_mib": memory,
                                                         "startup_log": [
            line for line in self.server.log_tail(400).splitlines() if any(
                word in line for word in ("captured", "rolling batch ready", "loaded in", "initialized"))]}

    def __exit__(self, *exc) -> None:
        if any(exc):
            print(self.server.log_tail(80), file=sys.stderr)
        self.server.stop()
        self.tmp.cleanup()


def run_baselines(args, levels: list[int], workloads, hw, model) -> list[dict]:
    from bench import baselines

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    llm, tokenizer = baselines.load(str(args.model_dir), dtype, device)
    rows = []
    for c in dict.fromkeys(levels):  # a level given twice (to see tpserve's run-to-run spread) is a baseline once
        texts, lengths = [t for t, _ in workloads[c]], [n for _, n in workloads[c]]
        for name, run in (("static", lambda: baselines.static_batches(llm, tokenizer, texts, args.output_len, c, device)),
                          ("generate_batch", lambda: baselines.continuous_batching(llm, tokenizer, texts, args.output_len, device))):
            if name == "generate_batch" and c == 1:
                continue  # continuous batching of one request at a time is the static baseline
            try:
                row = {"tp": 1, **run()}
                row["concurrency"] = c
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                row = {"path": f"transformers {name}", "tp": 1, "concurrency": c, "error": f"{type(exc).__name__}: {exc}"}
            if "output_tokens_per_s" in row:
                add_bounds(row, hw, model, lengths, args.output_len, c, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def gpu_memory_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(line) for line in out.split()]


def measure_hardware() -> Hardware:
    """Copy bandwidth (1 GiB device-to-device, read + write counted) and fp16 8192^3 matmul rate, medians of 10."""
    def timed(fn, repeats=10) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    flops = 2 * 8192**3 / timed(lambda: a @ a)
    del src, dst, a
    torch.cuda.empty_cache()
    return Hardware(bandwidth, flops)


def describe_model(model_dir: Path | None, dtype: str) -> dict:
    if model_dir is None:
        return {}
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                params += math.prod(f.get_slice(key).get_shape())
    size = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"name": Path(model_dir).name, "architecture": config.architectures[0] if config.architectures else None,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": heads, "kv_heads": kv_heads,
            "vocab": config.vocab_size, "dtype": dtype, "params": params, "weight_bytes": params * size,
            "kv_bytes_per_token": 2 * config.num_hidden_layers * kv_heads * head_dim * size}


def card() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores"


def commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without its git history (the GPU machine)
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(report: dict) -> None:
    model = report["model"]
    print(f"\n{report['card']}, commit {report['commit']}, {model.get('name')} ({model.get('params', 0) / 1e9:.2f} B "
          f"params, {model.get('dtype')}), prompts {report['settings']['prompt_len']} tokens, "
          f"{report['settings']['output_len']} output tokens")
    print("| path | TP | concurrency | requests | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 (ms) | "
          "ITL p50 / p99 (ms) | e2e p50 (ms) | roofline tok/s | share of roofline | batch-1 floor (ms) | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        def f(key, fmt="{:.0f}"):
            value = r.get(key)
            return "-" if value is None or value != value else fmt.format(value)
        print(f"| {r['path']} | {r.get('tp') or '-'} | {r['concurrency']} | {r.get('requests', '-')} | "
              f"{f('output_tokens_per_s')} | {f('requests_per_s', '{:.2f}')} | {f('ttft_p50_ms')} / {f('ttft_p99_ms')} | "
              f"{f('tpot_p50_ms', '{:.1f}')} | {f('itl_p50_ms', '{:.1f}')} / {f('itl_p99_ms', '{:.1f}')} | "
              f"{f('e2e_p50_ms')} | {f('roofline_tokens_per_s')} | {f('share_of_roofline', '{:.0%}')} | "
              f"{f('floor_tpot_ms', '{:.2f}')} | {r.get('errors', r.get('error', 0))} |")


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast must stay off on the lent machines
    main()
