"""Where a captured decode step's time goes under tensor parallelism (issue 13), in process, one rank per GPU,
no server: each rank loads its AutoTP shard as the built-in handler does, builds the engine (compiled and
captured, or captured only), then rank 0 reports the batch-1 and batch-N replay times, a profiler table of the
replay's kernels (all-reduces apart), and the cost of one hidden-state all-reduce inside a CUDA graph, over
NCCL and, where this torch has it, over symmetric memory (one-shot, NVLink peers, no multicast).

    torchrun --nproc-per-node N -m bench.tp_step --model-dir M [--rows 1 --rows 64] [--no-compile] [--out F]
             [--logits L]
    python -m bench.tp_step --compare L1 L2 L4     # logits of TP=1, 2, 4 runs on the same seeded inputs

`--logits` saves the first decode step's logits (every row, seeded prompts) for `--compare`, which reports how
far each TP's logits are from the first file's and whether the top token agrees: everywhere, and in the rows whose
top-2 margin is wider than that distance (a random-weight model has near-ties that any rounding flips).
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from bench.output import publish
from bench.step_time import per_call_ms


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    dist.barrier()
    return per_call_ms(graph.replay, repeats)


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int) -> dict:
    """GPU time (us) and kernel count per replay by kernel family, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    families: dict[str, list[float]] = {}
    for event in prof.key_averages():
        us = event.device_time_total / replays
        if us <= 0:
            continue
        name = event.key
        lower = name.lower()
        family = ("all-reduce (nccl)" if "nccl" in lower
                  else "all-reduce + residual add (one-shot)" if "one_shot_rows" in lower
                  else "all-reduce (one-shot)" if "one_shot" in lower
                  else "attention (flash)" if "flash" in lower
                  else "attention (decode kernel)" if "_decode_piece" in name or "_combine" in name
                  else "gemv (tpserve)" if "_gemv_" in name
                  else "gemm/gemv (cuBLAS)" if any(k in lower for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "splitk",
                                                                         "nvjet"))
                  else "kv write (index_copy)" if "index_elementwise" in lower
                  else "triton (fused)" if "triton" in lower else name[:60])
        entry = families.setdefault(family, [0.0, 0.0])
        entry[0] += us
        entry[1] += event.count / replays
    ordered = sorted(families.items(), key=lambda kv: -kv[1][0])
    return {"us": {name: round(v[0], 1) for name, v in ordered[:16]},
            "kernels": {name: round(v[1], 1) for name, v in ordered[:16]},
            "total_kernels": round(sum(v[1] for v in families.values()), 1)}


def allreduce_in_graph(hidden: int, rows: int, count: int = 64) -> dict:
    """Microseconds per all-reduce of a [rows, hidden] fp16 tensor, `count` of them captured in one graph."""
    out = {}
    x = torch.randn(rows, hidden, dtype=torch.float16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    dist.all_reduce(x)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(count):
            dist.all_reduce(x)
    out["nccl_us"] = round(replay_ms(graph, 20) * 1000 / count, 2)
    try:
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group)
        buf = symm_mem.empty(rows * hidden, dtype=torch.float16, device="cuda")
        symm_mem.rendezvous(buf, group)
        buf.copy_(x.view(-1))
        reduced = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
        expected = x.view(-1) * dist.get_world_size()
        torch.cuda.synchronize()
        out["symm_one_shot_matches"] = bool(torch.allclose(reduced.float(), expected.float(), rtol=1e-2, atol=1e-1))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(count):
                buf.copy_(x.view(-1))
                torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
        out["symm_one_shot_us"] = round(replay_ms(graph, 20) * 1000 / count, 2)
    except Exception as error:  # noqa: BLE001 - report what this torch lacks, keep the rest of the run
        out["symm_one_shot_error"] = f"{type(error).__name__}: {error}"[:300]
    return out


def compare(paths: list[str]) -> dict:
    """Each file's logits against the first's: max |difference|, top-token agreement overall and where the
    first file's top-2 margin exceeds twice that difference (a flip there would be a real error)."""
    reference = torch.load(paths[0])
    top2 = reference.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    out = {}
    for path in paths[1:]:
        other = torch.load(path)
        diff = (other - reference).abs().max().item()
        same = other.argmax(-1) == reference.argmax(-1)
        clear = margin > 2 * diff
        out[path] = {"max_abs_diff": round(diff, 4), "rows": len(same), "top_equal": int(same.sum()),
                     "clear_rows": int(clear.sum()), "top_equal_in_clear_rows": int(same[clear].sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir")
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--prefill", type=int, action="append", default=[],
                        help="also profile the captured prompt step of about this many tokens (256-token prompts)")
    parser.add_argument("--out")
    parser.add_argument("--logits", help="save the first decode step's logits here (rank 0)")
    parser.add_argument("--compare", nargs="+", help="compare saved logits files (no GPU run)")
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(args.compare), indent=1))
        return
    rows_list = args.rows or [1, 64]
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    world = dist.get_world_size()

    from handlers.loading import load_rank_model, load_tokenizer
    from serving.engine.loop import Engine
    from serving.engine.plan import Chunk, StepPlan
    started = time.monotonic()
    model = load_rank_model({"model_dir": args.model_dir, "tensor_parallel_degree": str(world)}, torch.float16)
    if world == 1:
        model = model.cuda()
    loaded = time.monotonic() - started
    slots = max([*rows_list, *(t // 256 for t in args.prefill)])  # a slot for each 256-token prompt of --prefill
    engine = Engine(model, load_tokenizer(args.model_dir), {2},
                    {"max_model_len": "1024", "max_rolling_batch_size": str(slots),
                     "torch_compile": str(not args.no_compile).lower()}, world)
    built = time.monotonic() - started - loaded
    prompt = 200
    ids = torch.randint(100, 30000, (max(rows_list), prompt), generator=torch.Generator().manual_seed(0)).tolist()
    for row in range(max(rows_list)):
        engine.step(StepPlan(prefill=[Chunk(row, 0, ids[row])], keep=[prompt - 1]))
    report = {"card": torch.cuda.get_device_name(0), "tp": world, "compiled": engine.runner.compiled is not None,
              "env": {k: v for k, v in os.environ.items() if k.startswith("TPSERVE_")},
              "load_s": round(loaded, 1), "engine_build_s": round(built, 1),
              "gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
    if args.logits:
        plan = StepPlan(list(range(max(rows_list))), [5] * max(rows_list), [prompt] * max(rows_list), [],
                        list(range(max(rows_list))))
        logits = engine.step(plan).cpu()
        if dist.get_rank() == 0:
            torch.save(logits, args.logits)
    for rows in rows_list:
        plan = StepPlan(list(range(rows)), [5] * rows, [prompt] * rows, [], list(range(rows)))
        dist.barrier()
        step = per_call_ms(lambda: engine.step(plan), 50)
        graph = engine.graphs.graphs[engine.graphs.buckets.pick(plan)][0]
        report[f"rows_{rows}"] = {"step_ms": round(step, 3), "replay_ms": round(replay_ms(graph, 50), 3),
                                  "kernels": kernel_table(graph, 10)}
    for tokens in args.prefill:
        prompts = [Chunk(slot, 0, ids[slot % len(ids)][:1] * 256) for slot in range(tokens // 256)]
        plan = StepPlan(prefill=prompts, keep=[256 * (i + 1) - 1 for i in range(len(prompts))])
        engine.step(plan)
        shape = engine.graphs.buckets.pick(plan)
        graph = engine.graphs.graphs[shape][0]
        report[f"prefill_{tokens}"] = {"tokens": plan.n_tokens, "graph_tokens": shape.tokens,
                                       "replay_ms": round(replay_ms(graph, 10), 3), "kernels": kernel_table(graph, 3)}
    hidden = model.config.hidden_size
    if world > 1:
        report["allreduce_1_row"] = allreduce_in_graph(hidden, 1)
        report["allreduce_64_rows"] = allreduce_in_graph(hidden, 64)
    if dist.get_rank() == 0:
        publish(report, args.out)
    # NCCL's and torch's teardown of a group that replayed captured collectives hung past the report in every
    # multi-rank run on the H200s (rc 124 after 240 s); the report is written, so leave without it
    os._exit(0)


if __name__ == "__main__":
    main()
