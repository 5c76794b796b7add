"""Loading from pre-sharded checkpoints vs from the original, through the real server (issue 11).

For one model at one tensor_parallel_degree: shard it once with `tpserve shard` (timed), then start tpserve
alternately on the original folder and on the shard folder, and measure
- start -> ready: from launching `tpserve` to the model being READY (GET /models);
- peak host memory of each rank: VmHWM of every `serving.rank` process, read once the model is ready;
- the model load inside each rank, wall and CPU seconds (handlers.loading's "model ready" line: weights and
  sharding, without process start, imports and tokenizer); on a shared machine CPU seconds compare, wall does not;
- CPU seconds each rank spent until ready (user + system): the work of loading, which unlike wall time does
  not grow when other processes share the cores;
- the greedy token ids of one request, which must be equal both ways.
Prints a Markdown table; writes JSON to $OUT/shard_load.json when OUT is set (or to --out).

    python -m bench.shard_load --model demo --tp 2                 # the CPU demo (SmolLM2-135M fp32)
    python -m bench.shard_load --model llama7b --tp 2 --tokenizer DIR   # GPU machine: a random-weight
                                                                        # Llama-2-7B-shaped fp16 checkpoint

The page cache is warm after the first start (the files were just written or read): both ways are measured
warm, alternating, `--repeats` times each. `--drop-caches` (root, on a machine that allows it) drops the page
cache before every start instead, which is what a fresh pod on a fresh node sees.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.server import ROOT, Server

PROMPT = "The capital of France is"
# handlers.loading's line once a rank has its model (weights and sharding, without process start, imports
# and tokenizer): wall and CPU seconds.
RANK_LOADED = re.compile(r"tpserve\.handlers\.loading: rank\d+ model ready from .* in ([\d.]+) s, ([\d.]+) s CPU")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "llama7b"], default="demo")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, help="llama7b: a tokenizer folder (SmolLM2's)")
    parser.add_argument("--workdir", type=Path, help="where to build the model and shards (default: a temp dir)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before every start")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "shard_load.json"
                        if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.model == "demo":
            source, dtype = ROOT / "model_store" / "smollm2" / "model", "fp32"
        else:
            from bench.gpu_tp import build_model
            source, dtype = work / "llama7b-original", "fp16"
            build_model(source, args.tokenizer)
        shards = work / f"shards-tp{args.tp}"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "serving.cli", "shard", "--model-dir", str(source),
                        "--tensor-parallel-degree", str(args.tp), "--out", str(shards), "--dtype", dtype],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        shard_s = time.monotonic() - started
        print(f"sharded in {shard_s:.1f} s", flush=True)
        manifest = json.loads((shards / "tpserve-shards.json").read_text())
        shard_bytes = [(shards / name).stat().st_size for name in manifest["files"]]
        source_bytes = folder_bytes(source, ".safetensors")

        runs = {"original": [], "pre-sharded": []}
        for _ in range(args.repeats):
            for way, folder in (("original", source), ("pre-sharded", shards)):
                if args.drop_caches:
                    drop_page_cache()
                runs[way].append(start_once(folder, args.tp, dtype, work / f"{way}.log"))
                print(way, runs[way][-1], flush=True)

    assert runs["original"][0]["tokens"] == runs["pre-sharded"][0]["tokens"], "the two ways generated differently"
    result = {
        "model": args.model, "tp": args.tp, "dtype": dtype, "repeats": args.repeats, "drop_caches": args.drop_caches,
        "source_bytes": source_bytes, "shard_bytes_per_rank": shard_bytes,
        "shard_command_s": round(shard_s, 1), "runs": runs,
        "machine": machine(),
    }
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def start_once(folder: Path, tp: int, dtype: str, log: Path) -> dict:
    """Start tpserve on `folder`, wait until READY; peak RSS of each rank; one greedy request."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench"
        model_dir.mkdir()
        (model_dir / "serving.properties").write_text(
            f"engine=DeepSpeed\noption.model_id={folder}\noption.tensor_parallel_degree={tp}\noption.dtype={dtype}\n")
        server = Server(["-m", str(model_dir)], log)
        try:
            state = server.wait_for_models(timeout=900)["bench"]
            ready_s = time.monotonic() - server.started
            assert state["state"] == "READY", server.log_tail()
            ranks = [p for p in server.descendants() if is_rank(safe_cmdline(p))]
            peaks = sorted(peak_rss_mib(p.pid) for p in ranks)
            cpu = sorted(round(sum(p.cpu_times()[:2]), 1) for p in ranks)
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
            response = server.post("/predictions/bench", json=body, timeout=300)
            assert response.status_code == 200, response.text
            tokens = [t["id"] for t in response.json()["details"]["tokens"]]
        finally:
            server.stop()
    loads = RANK_LOADED.findall(log.read_text(errors="replace"))
    return {"ready_s": round(ready_s, 2), "load_ms_reported": state.get("loaded_in_ms"),
            "peak_rss_mib_per_rank": peaks, "cpu_s_per_rank": cpu,
            "model_load_s_per_rank": sorted(float(wall) for wall, _ in loads),
            "model_load_cpu_s_per_rank": sorted(float(seconds) for _, seconds in loads),
            "tokens": tokens}


def is_rank(cmdline: list[str]) -> bool:
    """A rank's own Python process (not mpirun/prterun, whose arguments also name serving.rank)."""
    return bool(cmdline) and Path(cmdline[0]).name.startswith("python") and "serving.rank" in cmdline


def safe_cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def peak_rss_mib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had (anonymous and mapped file pages)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def folder_bytes(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(suffix))


def machine() -> dict:
    import torch
    info = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def table(result: dict) -> str:
    lines = [f"{result['model']}, TP={result['tp']}, {result['dtype']}; "
             f"source {result['source_bytes'] / 2**20:,.0f} MiB, "
             f"shards {', '.join(f'{b / 2**20:,.0f}' for b in result['shard_bytes_per_rank'])} MiB per rank; "
             f"`tpserve shard` took {result['shard_command_s']} s",
             "",
             "| load from | start -> ready (s), median | runs (s) | model load per rank: wall s / CPU s, median | "
             "CPU s per rank until ready, median | peak host RSS per rank (MiB), median |",
             "|---|---|---|---|---|---|"]
    for way, runs in result["runs"].items():
        ready = [run["ready_s"] for run in runs]
        walls, cpus = per_rank_median(runs, "model_load_s_per_rank"), per_rank_median(runs, "model_load_cpu_s_per_rank")
        lines.append(f"| {way} | {statistics.median(ready):.1f} | {', '.join(f'{r:.1f}' for r in ready)} | "
                     f"{', '.join(f'{w:.2f} / {c:.2f}' for w, c in zip(walls, cpus))} | "
                     f"{', '.join(f'{m:,.1f}' for m in per_rank_median(runs, 'cpu_s_per_rank'))} | "
                     f"{', '.join(f'{m:,.0f}' for m in per_rank_median(runs, 'peak_rss_mib_per_rank'))} |")
    return "\n".join(lines)


def per_rank_median(runs: list[dict], key: str) -> list[float]:
    ranks = min(len(run[key]) for run in runs)  # 0 when a handler does not log its load time
    return [statistics.median(run[key][i] for run in runs) for i in range(ranks)]


if __name__ == "__main__":
    main()
