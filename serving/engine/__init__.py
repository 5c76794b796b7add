"""The rolling-batch engine: many requests decode together, a new one joins at the next step, a finished one
leaves at once. Rank 0 schedules and samples; every rank runs the same forward over its own slot cache.

    request.py     one request's rows and their state (rank 0)
    scheduler.py   which rows prefill and decode this step, under the slot and prefill-token budgets (rank 0)
    plan.py        the step's plan: the small fixed-layout message rank 0 broadcasts
    kv_cache.py    the slot cache: K and V of every row, allocated once from a budget
    attention.py   attention over the slot cache, registered with transformers' attention interface
    decode_attention.py  decode-only steps: a split-keys Triton kernel that also writes the step's K/V (CUDA)
    runner.py      one forward of the model for a plan (every rank)
    graphs.py      CUDA graphs of the step, one per bucket of rows or prompt tokens (every rank)
    allreduce.py   TP > 1: the row-parallel layers' all-reduce, one-shot over symmetric memory (every rank)
    residual.py    TP > 1: each all-reduce joined to the decoder layer's residual add and norm (every rank)
    gemv.py        projections of up to 16 rows: Triton kernels that stream the weights (CUDA, every rank)
    pdl.py         programmatic dependent launch of the Triton kernels: the next starts as this one ends (CUDA)
    sampling.py    each row's next token with its own parameters and generator (rank 0)
    detokenize.py  incremental text and stop sequences (rank 0)
    formats.py     stream events and answers in LMI's or TGI's shape (rank 0; the one-at-a-time path too)
    loop.py        the engine as a whole: rank 0's loop, the other ranks' step
"""
