"""The serving benchmark's arithmetic (bench/metrics.py)."""
import math

import pytest

from bench.metrics import (Hardware, Shape, Timing, floor_tpot, percentile, roofline_tokens_per_s, summarize,
                           timeline_summary)


def test_percentiles_interpolate_between_ranks():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))


def test_a_streamed_request_gives_ttft_tpot_itl_and_e2e():
    timing = Timing(sent=10.0, arrivals=[10.5, 10.6, 10.8, 11.1])
    assert timing.ttft == pytest.approx(0.5)
    assert timing.tpot == pytest.approx(0.2)
    assert timing.gaps == pytest.approx([0.1, 0.2, 0.3])
    assert timing.e2e == pytest.approx(1.1)
    assert Timing(sent=0, arrivals=[1.0]).tpot is None


def test_summary_counts_tokens_over_the_duration_and_leaves_errors_out():
    ok = [Timing(0.0, [1.0, 2.0]), Timing(0.0, [2.0, 3.0, 4.0])]
    failed = Timing(0.0, error="503")
    row = summarize(ok + [failed], duration=5.0)
    assert (row["requests"], row["errors"], row["output_tokens"]) == (3, 1, 5)
    assert row["output_tokens_per_s"] == 1.0 and row["requests_per_s"] == 0.4
    assert row["ttft_p50_ms"] == 1500.0 and row["tpot_p50_ms"] == 1000.0 and row["e2e_p99_ms"] == pytest.approx(3980)


def test_roofline_counts_weights_per_step_kv_per_row_and_prompt_flops():
    shape = Shape(weight_bytes=1000, params=500, kv_bytes_per_token=10)
    hw = Hardware(bandwidth=1000.0, flops=1e6)
    # 2 prompts of 4 tokens, 3 output tokens, both in one wave: 3 steps x 1000 bytes of weights;
    # KV read: per row 3*4 + 3*2/2 = 15 tokens, x2 rows x 10 bytes = 300 bytes; prefill 2*500*8 = 8000 FLOPs
    expected_s = (3 * 1000 + 300) / 1000 + 8000 / 1e6
    assert roofline_tokens_per_s(shape, hw, [4, 4], 3, concurrency=2) == pytest.approx(6 / expected_s)
    # one at a time: two waves, twice the weight reads
    expected_s = (6 * 1000 + 300) / 1000 + 8000 / 1e6
    assert roofline_tokens_per_s(shape, hw, [4, 4], 3, concurrency=1) == pytest.approx(6 / expected_s)
    # two cards share the bytes and the FLOPs
    assert roofline_tokens_per_s(shape, hw, [4, 4], 3, 2, tp=2) == pytest.approx(
        2 * roofline_tokens_per_s(shape, hw, [4, 4], 3, 2))
    assert floor_tpot(shape, hw) == 1.0 and floor_tpot(shape, hw, tp=2) == 0.5


def test_a_step_timeline_gives_the_busy_share_the_gaps_and_the_time_by_kind():
    def step(kind, tokens, padded, gpu, host):
        return {"kind": kind, "tokens": tokens, "padded": padded, "gpu_ms": gpu,
                "host_ms": dict(zip(("begin", "queued", "emitted", "sampled"), host))}
    records = [step("prefill 512", 400, 512, [0.0, 10.0], [0, 1, 2, 3]),
               step("decode 8", 8, 8, [10.5, 14.5], [4, 5, 7, 8]),
               step("decode 8", 7, 8, [34.5, 38.5], [30, 31, 34, 35])]
    records[1]["gc"] = [[0, 0.25], [2, 19.5]]  # a full collection stalled the loop after the first decode step
    for record in records:  # the host's Unix clock when it began each step
        record["unix_ms"] = 1000.0 + record["host_ms"]["begin"]
    summary = timeline_summary(records)
    assert summary["steps"] == 3 and summary["span_ms"] == 38.5
    assert summary["gc"] == {"collections": 2, "ms": 19.8, "longest_ms": 19.5, "full": 1}
    assert (summary["first_step_unix_ms"], summary["last_step_end_unix_ms"]) == (1000.0, 1038.5)
    # device times count from the first step the server ever recorded, not this level's first
    later = timeline_summary([{**r, "gpu_ms": [t + 5000 for t in r["gpu_ms"]]} for r in records])
    assert (later["first_step_unix_ms"], later["last_step_end_unix_ms"]) == (1000.0, 1038.5)
    assert summary["gpu_busy_share"] == round(18 / 38.5, 3)
    assert summary["gaps"]["total_ms"] == 20.5 and summary["gaps"]["under_1ms_count"] == 1
    assert summary["gaps"]["largest"][0] == {"ms": 20.0, "after": "decode 8", "before": "decode 8", "at_ms": 14}
    assert summary["by_kind"]["decode 8"] == {"steps": 2, "gpu_ms": 8.0, "tokens": 15, "padded_tokens": 16,
                                              "ms_per_step": 4.0}
    assert summary["host"] == {"begin_to_queued_p50_ms": 1.0, "queued_to_emitted_p50_ms": 2.0,
                               "emitted_to_sampled_p50_ms": 1.0}
    # without device times (a CPU run): the host's part only
    for record in records:
        del record["gpu_ms"]
    # the last step's begin plus its forward (1 ms)
    assert timeline_summary(records) == {"steps": 3, "host": summary["host"], "gc": summary["gc"],
                                         "first_step_unix_ms": 1000.0, "last_step_end_unix_ms": 1031.0}


def test_the_load_generator_freezes_what_exists_and_counts_its_own_collections():
    """bench.load.client_gc: objects from before a level are frozen (a full collection skips them), the
    collections inside are counted with their time, and everything is as before afterwards."""
    import gc

    from bench.load import client_gc

    assert gc.get_freeze_count() == 0
    callbacks = list(gc.callbacks)
    with client_gc() as stats:
        assert gc.get_freeze_count() > 1000  # this process's modules, pytest's objects
        gc.collect()
        gc.collect(0)
    assert stats["collections"] == 2 and stats["ms"] >= stats["longest_ms"] > 0
    assert gc.get_freeze_count() == 0 and gc.callbacks == callbacks


def test_the_timeline_hears_the_collections_of_its_process(tmp_path):
    """serving/engine/timeline.py: a garbage collection during a step is recorded on that step, with its
    generation; after close() collections are not heard any more."""
    import gc
    import json

    import torch

    from serving.engine.timeline import Timeline

    timeline = Timeline(tmp_path / "t.jsonl", torch.device("cpu"))
    gc.collect()  # nothing left over to collect during the step but what the test asks for
    timeline.begin("decode 1", 1, 1)
    timeline.queued()
    gc.collect()
    timeline.flush()
    timeline.close()
    timeline.begin("decode 1", 1, 1)
    gc.collect()
    (record,) = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [generation for generation, _ in record["gc"]] == [2] and record["gc"][0][1] >= 0
    assert "gc" not in timeline.records[-1]


def test_partings_name_the_first_differing_token_and_the_margin_it_stood_on():
    from bench.metrics import partings
    from bench.serve import greedy_partings

    reference, margins = [[1, 2, 3], [4, 5, 6], [7, 8]], [[2.0, 0.01, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5]]
    assert partings(reference, margins, [[1, 9, 3], [4, 5, 6], [7]]) == [
        {"token": 1, "margin": 0.01}, None, {"token": 1, "margin": 0.5}]
    greedy = {"tpserve TP=1": reference, "tpserve eager TP=1": reference, "tpserve TP=2": [[1, 2, 4], [4, 5, 6], [7, 8]]}
    found = greedy_partings(greedy, {name: margins for name in greedy})
    assert found == {"tpserve TP=1 against tpserve eager TP=1": [None, None, None],
                     "tpserve TP=2 against tpserve TP=1": [{"token": 2, "margin": 1.0}, None, None]}
