"""tpserve::all_reduce (serving/engine/allreduce.py, one-shot over symmetric memory) against NCCL, one rank per
GPU of one host (issue 13), on [rows, 4096] messages in fp16 and bf16 (rows 1, 8, 64, 128):

  correctness  against an fp32 NCCL all-reduce of the same inputs; whether every rank got bit-identical
               results; over 1, 2 and 3 back-to-back calls and a run of different sizes, with one rank held
               back (torch.cuda._sleep) before each call in turn, and over replays of a captured graph of three
               calls (the slots and flags must stay in step across replays)
  graph_us     microseconds per all-reduce, 64 captured in one CUDA graph: NCCL, tpserve, and torch's own
               symm_mem one-shot where this torch has it for the dtype
  compiled     a torch.compile'd module (matmul -> tpserve::all_reduce -> add) as the engine compiles a layer:
               graph breaks (none expected), its output against eager, and its time per call captured in a
               graph, against the same module with NCCL through functional collectives

Rank 0 prints a JSON summary and writes it to --out. A watchdog ends every rank (traceback on stderr) if a
section outlives --section-timeout, as a deadlocked barrier would.

    torchrun --nproc-per-node N -m bench.allreduce [--out F] [--max-bytes B] [--section-timeout S]
"""
import argparse
import faulthandler
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from bench.output import publish
from serving.engine import allreduce

HIDDEN = 4096
ROWS = (1, 8, 64, 128)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CALLS_PER_GRAPH = 64
SKEW_CYCLES = 2_000_000  # about 1 ms: far longer than an all-reduce, so the others run ahead


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--max-bytes", type=int, default=2 * 2**20,
                        help="the one-shot path's largest message (default 2 MiB: every size here)")
    parser.add_argument("--section-timeout", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast, as on the serving machines
    watchdog = Watchdog(args.section_timeout)
    watchdog.arm("start")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timedelta(seconds=args.section_timeout), device_id=device)
    group = dist.group.WORLD
    path = allreduce.prepare(group, device, max_bytes=args.max_bytes)
    import triton
    report = {"card": torch.cuda.get_device_name(device), "world": dist.get_world_size(), "torch": torch.__version__,
              "triton": triton.__version__, "path": path, "one_shot_max_bytes": args.max_bytes,
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    bench = Bench(group, device, one_shot=path.startswith("one-shot"), max_bytes=args.max_bytes)
    for section in ("correctness", "graph_us", "compiled"):
        watchdog.arm(section)
        report[section] = getattr(bench, section)()
    report["all_ok"] = bench.all_ok
    if dist.get_rank() == 0:
        publish(report, args.out)
    watchdog.arm("teardown")
    torch.cuda.synchronize()
    allreduce.release()
    dist.destroy_process_group()
    watchdog.disarm()


class Watchdog:
    """faulthandler's timer: dumps every thread's stack and exits the process when a section overruns (a
    kernel spinning on a flag never returns to Python, so nothing else can end it)."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        faulthandler.enable()

    def arm(self, section: str) -> None:
        print(f"[rank {os.environ.get('RANK', 0)}] {section}", flush=True)
        faulthandler.dump_traceback_later(self.seconds, exit=True)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class Bench:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, one_shot: bool, max_bytes: int):
        self.group, self.device, self.one_shot, self.max_bytes = group, device, one_shot, max_bytes
        self.name = group.group_name
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.all_ok = True

    # correctness -------------------------------------------------------------------------------------------

    def correctness(self) -> dict:
        out = {}
        for label, dtype in DTYPES.items():
            cases = {}
            for rows in ROWS:
                cases[f"rows_{rows}"] = {
                    "one_shot": self.one_shot and rows * HIDDEN * dtype.itemsize <= self.max_bytes,
                    "single": self.calls(dtype, [rows], skew=False),
                    "back_to_back_2_skewed": self.calls(dtype, [rows] * 2, skew=True),
                    "back_to_back_3_skewed": self.calls(dtype, [rows] * 3, skew=True),
                    "graph_3_calls_4_replays_skewed": self.graph_replays(dtype, rows),
                }
            cases["sizes_1_128_8_64_1_skewed"] = self.calls(dtype, [1, 128, 8, 64, 1], skew=True)
            out[label] = cases
        return out

    def calls(self, dtype: torch.dtype, rows: list[int], skew: bool) -> dict:
        """len(rows) all-reduces one after another with no synchronisation between them; with `skew`, rank
        i % world sleeps on the GPU before call i."""
        inputs = [self.random(r, dtype, seed) for seed, r in enumerate(rows)]
        torch.cuda.synchronize()
        dist.barrier()
        outputs = []
        for i, x in enumerate(inputs):
            if skew and self.rank == i % self.world:
                torch.cuda._sleep(SKEW_CYCLES)
            outputs.append(torch.ops.tpserve.all_reduce(x, self.name))
        return self.judge(inputs, outputs)

    def graph_replays(self, dtype: torch.dtype, rows: int, calls: int = 3, replays: int = 4) -> dict:
        """An odd number of calls captured in one graph (skewed as in `calls`), replayed with new inputs."""
        static = [self.random(rows, dtype, seed) for seed in range(calls)]
        for x in static:  # warm up outside the capture (Triton compiles here, symmetric memory is set up)
            torch.ops.tpserve.all_reduce(x, self.name)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            results = []
            for i, x in enumerate(static):
                if self.rank == i % self.world:
                    torch.cuda._sleep(SKEW_CYCLES)
                results.append(torch.ops.tpserve.all_reduce(x, self.name))
        verdicts = []
        for replay in range(replays):
            for i, x in enumerate(static):
                x.copy_(self.random(rows, dtype, 100 * (replay + 1) + i))
            torch.cuda.synchronize()
            dist.barrier()
            graph.replay()
            verdicts.append(self.judge(static, [r.clone() for r in results]))
        return {key: (max(v[key] for v in verdicts) if key.startswith("max") else all(v[key] for v in verdicts))
                for key in verdicts[0]}

    def judge(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict:
        """Each output against an fp32 NCCL sum of its input; the worst over calls and ranks."""
        worst, nccl_worst, close, identical = 0.0, 0.0, True, True
        for x, y in zip(inputs, outputs):
            reference = x.float()
            dist.all_reduce(reference, group=self.group)
            nccl = x.clone()
            dist.all_reduce(nccl, group=self.group)
            worst = max(worst, (y.float() - reference).abs().max().item())
            nccl_worst = max(nccl_worst, (nccl.float() - reference).abs().max().item())
            eps = torch.finfo(x.dtype).eps
            close &= torch.allclose(y.float(), reference, rtol=eps, atol=1e-5)
            gathered = [torch.empty_like(y) for _ in range(self.world)]
            dist.all_gather(gathered, y, group=self.group)
            identical &= all(torch.equal(gathered[0], other) for other in gathered)
        verdict = {"max_abs_diff": self.across_ranks(worst, dist.ReduceOp.MAX),
                   "max_abs_diff_nccl_same_dtype": self.across_ranks(nccl_worst, dist.ReduceOp.MAX),
                   "close": bool(self.across_ranks(float(close), dist.ReduceOp.MIN)),
                   "bit_identical_across_ranks": identical}
        self.all_ok &= verdict["close"] and identical
        return verdict

    # timings -----------------------------------------------------------------------------------------------

    def graph_us(self) -> dict:
        out = {}
        for label, dtype in DTYPES.items():
            for rows in ROWS:
                x, in_place = self.random(rows, dtype, 0), self.random(rows, dtype, 0)
                times = {"nccl": self.captured_us(lambda: dist.all_reduce(in_place, group=self.group)),
                         "tpserve": self.captured_us(lambda: torch.ops.tpserve.all_reduce(x, self.name))}
                times.update(self.torch_symm_mem_us(x))
                out[f"{label}_rows_{rows}"] = {"bytes": x.numel() * x.element_size(), **times}
        return out

    def captured_us(self, issue, count: int = CALLS_PER_GRAPH, replays: int = 20) -> float:
        """Microseconds per call of `issue`, `count` calls captured in one graph (the median of `replays`)."""
        for _ in range(2):
            issue()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(count):
                issue()
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / count)
        return round(sorted(times)[len(times) // 2], 2)

    def torch_symm_mem_us(self, x: torch.Tensor) -> dict:
        """torch's own one-shot (no fp16 in torch 2.11), for comparison."""
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buffer = symm_mem.empty(x.numel(), dtype=x.dtype, device=self.device)
            symm_mem.rendezvous(buffer, self.name)
            buffer.copy_(x.view(-1))
            return {"torch_symm_mem_one_shot": self.captured_us(
                lambda: torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", self.name))}
        except Exception as error:  # noqa: BLE001 - report what this torch lacks, keep the rest of the run
            torch.cuda.synchronize()
            return {"torch_symm_mem_one_shot_error": f"{type(error).__name__}: {error}"[:200]}

    # compiled ----------------------------------------------------------------------------------------------

    def compiled(self) -> dict:
        out = {}
        for label, dtype in DTYPES.items():
            for rows in (1, 64):
                torch._dynamo.reset()  # fresh caches: no recompile limit reached across the cases
                x = self.random(rows, dtype, 0)
                torch.manual_seed(self.rank)
                tpserve = Probe(lambda y: torch.ops.tpserve.all_reduce(y, self.name), dtype, self.device)
                nccl = Probe(self.functional_all_reduce, dtype, self.device)
                nccl.weight = tpserve.weight
                explained = torch._dynamo.explain(tpserve)(x)
                eager = tpserve(x)
                compiled_tpserve = torch.compile(tpserve, dynamic=True)
                compiled_nccl = torch.compile(nccl, dynamic=True)
                result = compiled_tpserve(x)
                case = out[f"{label}_rows_{rows}"] = {
                    "graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
                    "max_abs_diff_compiled_vs_eager": (result.float() - eager.float()).abs().max().item(),
                    "captured_us_tpserve": self.captured_us(lambda: compiled_tpserve(x), count=16)}
                try:  # the baseline: NCCL as Inductor emits it from functional collectives
                    nccl_result = compiled_nccl(x)
                    case["max_abs_diff_nccl_vs_tpserve"] = (nccl_result.float() - result.float()).abs().max().item()
                    case["captured_us_nccl_functional"] = self.captured_us(lambda: compiled_nccl(x), count=16)
                except Exception as error:  # noqa: BLE001 - keep the rest of the run
                    torch.cuda.synchronize()
                    case["nccl_functional_error"] = f"{type(error).__name__}: {error}"[:200]
                self.all_ok &= explained.graph_break_count == 0
        return out

    def functional_all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol
        return funcol.all_reduce(y, "sum", self.group)

    # helpers -----------------------------------------------------------------------------------------------

    def random(self, rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(1000 * seed + self.rank)
        return torch.randn(rows, HIDDEN, generator=generator, device=self.device).to(dtype)

    def across_ranks(self, value: float, op: dist.ReduceOp) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.item()


class Probe(nn.Module):
    """A row-parallel projection as a decoder layer has it: matmul, all-reduce, residual add."""

    def __init__(self, reduce, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.reduce = reduce
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN, device=device, dtype=dtype) * 0.02,
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x @ self.weight) + x


if __name__ == "__main__":
    main()
