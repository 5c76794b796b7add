"""The garbage collector's view of a long-lived process: what it loaded at startup is frozen out of collections.

Python's full collection visits every object that can hold references. A process that has loaded what it serves
with (the front end's app; a rank's torch, transformers, model and compiled code) keeps those objects until it
exits, so visiting them again only costs: on the ranks it is a pause of every step in flight.
"""
import gc
import logging
import os
import time

log = logging.getLogger("tpserve.heap")
FREEZE = os.environ.get("TPSERVE_GC_FREEZE", "1") != "0"  # 0: no freeze (A/B benchmarks)


def freeze_loaded_objects(who: str) -> None:
    """Move every object alive now into the garbage collector's permanent generation (gc.freeze): what a process
    holds once loaded lives as long as it does. A rank holds ~600,000 objects after loading a model (torch,
    transformers, the model's modules, compiled code), and one full collection of them took 430-470 ms on the
    2-core box: a stall of every step in flight, whenever the objects of requests set one off. Frozen, a full
    collection only visits what came after."""
    if not FREEZE:
        return
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    log.info("%s: %d objects frozen for the garbage collector in %d ms", who, gc.get_freeze_count(),
             (time.monotonic() - started) * 1000)
