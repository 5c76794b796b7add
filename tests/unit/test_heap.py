"""A loaded rank freezes what it loaded out of the garbage collector's full collections (serving/heap.py), and
collection still works for everything that comes after."""
import gc
import sys

from serving.frames import Init
from serving.rank.worker import Worker


class Cycle:
    def __init__(self):
        self.me = self


def test_a_loaded_rank_freezes_what_it_loaded_and_still_collects_new_garbage(tmp_path):
    handler = tmp_path / "frozen_handler.py"
    handler.write_text("LOADED = [object() for _ in range(1000)]\n\ndef handle(inputs):\n    return None\n")
    assert gc.get_freeze_count() == 0
    try:
        assert Worker(0).load(Init(properties={"model_dir": str(tmp_path)}, entry_point=str(handler))) is None
        loaded = sys.modules["frozen_handler"].LOADED
        assert gc.get_freeze_count() > 1000
        assert not any(o is loaded for o in gc.get_objects())  # frozen: in no generation a collection visits
        cycles = [Cycle() for _ in range(100)]
        del cycles
        assert gc.collect() >= 100  # cyclic garbage made after the freeze is still found
    finally:
        gc.unfreeze()
        sys.modules.pop("frozen_handler", None)
