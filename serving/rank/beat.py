"""Every rank's heartbeat: a daemon thread touches `$TPSERVE_BEAT_DIR/rank<i>` once a second.

The front end reads the files' mtimes. A rank that is stopped (SIGSTOP), frozen in a call that holds the GIL,
or dead stops beating, whichever rank it is; rank 0's answers to heartbeat frames only ever spoke for rank 0's
reader thread. The file also records the rank's pid and start time, so the front end can kill a rank that
outlived its mpirun.
"""
import os
import threading
import time
from pathlib import Path

ENV = "TPSERVE_BEAT_DIR"
INTERVAL = 1.0


def start(rank: int) -> None:
    """Begin beating (no-op outside a tpserve group)."""
    beat_dir = os.environ.get(ENV)
    if not beat_dir:
        return
    path = Path(beat_dir) / f"rank{rank}"
    from serving.namespace import write_identity
    write_identity(path, os.getpid())
    threading.Thread(target=_beat, args=(path,), name="beat", daemon=True).start()


def _beat(path: Path) -> None:
    while True:
        try:
            os.utime(path)
        except OSError:  # the group's folder is gone: the front end is tearing the group down
            return
        time.sleep(INTERVAL)
