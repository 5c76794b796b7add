"""Where one server instance keeps its files, and how they are removed whatever way the instance ends.

Every instance owns two folders named after the front end's pid:

    /tmp/tpserve-<pid>/           owner (pid + start time), and per worker group `<model>-<n>/`:
        <model>-<n>/rank0.sock    the front end <-> rank 0 socket
        <model>-<n>/beat/rank<i>  each rank's heartbeat file (mtime = last beat; content = its pid, start time)
        <model>-<n>/pids          mpirun's pid and start time
        <model>-<n>/shm           glob patterns of /dev/shm files the group's libraries create (DeepSpeed's)
        tmp/                      TMPDIR of mpirun and the ranks: Open MPI's session folders land here
    /dev/shm/tpserve-<pid>/       Open MPI's shared-memory segments (btl_sm_backing_directory)

A clean shutdown removes both. A front end killed with SIGKILL cannot, so at start it launches a reaper
(`python -m serving.namespace --reap ROOT`), a small process in its own session that waits for the front end to
die and then kills what the namespace records and removes it. And every instance, at start, sweeps the
namespaces whose owner is gone (the reaper was killed too, the container restarted, the box rebooted with a
/dev/shm volume that outlived it).
"""
import argparse
import glob
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

log = logging.getLogger("tpserve.namespace")

PREFIX = "tpserve-"
TMP_BASE = Path(os.environ.get("TPSERVE_TMP_BASE", "/tmp"))
SHM_BASE = Path(os.environ.get("TPSERVE_SHM_BASE", "/dev/shm"))


class Namespace:
    """This instance's folders. `group_dir(name)` gives each worker group (and each restart) a fresh folder."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.root = TMP_BASE / f"{PREFIX}{self.pid}"
        self.shm = SHM_BASE / f"{PREFIX}{self.pid}"
        self.tmp = self.root / "tmp"
        self._groups = 0
        self.reaper: subprocess.Popen | None = None

    def create(self) -> "Namespace":
        # Our own pid may name a folder left by an earlier instance (a container's pid 1): it is stale.
        if self.root.exists() or self.shm.exists():
            reap(self.root, self.shm)
        self.tmp.mkdir(parents=True, mode=0o700)
        if SHM_BASE.is_dir():
            self.shm.mkdir(mode=0o700, exist_ok=True)
        (self.root / "owner").write_text(_identity(self.pid))
        return self

    def group_dir(self, name: str) -> Path:
        self._groups += 1
        path = self.root / f"{name[:40]}-{self._groups}"
        (path / "beat").mkdir(parents=True)
        return path

    def start_reaper(self) -> None:
        """A process that outlives a front end killed with SIGKILL, to clean up after it."""
        self.reaper = subprocess.Popen(
            [sys.executable, "-m", "serving.namespace", "--reap", str(self.root), "--owner", str(self.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the terminal's process group must not take it down first
            env={**os.environ, "PYTHONPATH": _project_path()})

    def remove(self) -> None:
        """Clean shutdown: the groups are stopped already; remove the folders and let the reaper go."""
        reap(self.root, self.shm)
        if self.reaper is not None:
            self.reaper.terminate()
            try:
                self.reaper.wait(5)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
                self.reaper.wait()


def record_group(group_dir: Path, mpirun_pid: int, master_port: int | None) -> None:
    (group_dir / "pids").write_text(_identity(mpirun_pid))
    if master_port:
        (group_dir / "shm").write_text(shm_pattern(master_port) + "\n")


def shm_pattern(master_port: int) -> str:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank> behind."""
    return str(SHM_BASE / f"deepspeed_allreduce_buffer_*_127.0.0.1_{master_port}_*")


def group_processes(group_dir: Path) -> list[psutil.Process]:
    """mpirun and every rank the group's files record, if still the same processes (pids get reused)."""
    records = [group_dir / "pids"] + sorted((group_dir / "beat").glob("rank*"))
    procs = []
    for path in records:
        proc = _process_of(path)
        if proc is not None:
            procs.append(proc)
    return procs


def kill_group(group_dir: Path, extra: list[psutil.Process] = (), timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL mpirun, every recorded rank and their process groups, even when mpirun is long gone; wait until
    they are gone. Returns the processes still alive after `timeout` (none, unless a process is in D state)."""
    procs = {p.pid: p for p in [*group_processes(group_dir), *extra]}
    for proc in list(procs.values()):
        try:
            procs.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            pass
    own_group = os.getpgrp()
    groups = set()
    for proc in procs.values():
        try:
            groups.add(os.getpgid(proc.pid))
        except OSError:
            pass
    for pgid in groups - {own_group}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for proc in procs.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    return alive


def remove_group_files(group_dir: Path) -> None:
    shm_list = group_dir / "shm"
    if shm_list.exists():
        for pattern in shm_list.read_text().split():
            for path in glob.glob(pattern):
                _unlink(path)
    shutil.rmtree(group_dir, ignore_errors=True)


def reap(root: Path, shm: Path) -> None:
    """Kill whatever a namespace records and remove its files."""
    if root.is_dir():
        for group_dir in root.iterdir():
            if (group_dir / "beat").is_dir():
                kill_group(group_dir)
                remove_group_files(group_dir)
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)


def sweep_stale() -> list[str]:
    """Reap every namespace whose owner is gone; returns the folders removed."""
    removed = []
    names = {p.name for base in (TMP_BASE, SHM_BASE) if base.is_dir() for p in base.glob(f"{PREFIX}*")}
    for name in sorted(names):
        suffix = name[len(PREFIX):]
        if not suffix.isdigit() or int(suffix) == os.getpid():
            continue
        root, shm = TMP_BASE / name, SHM_BASE / name
        if _owner_alive(root / "owner"):
            continue
        reap(root, shm)
        removed.append(name)
    if removed:
        log.warning("removed the files and processes of %d instance(s) that died without cleaning up: %s",
                    len(removed), ", ".join(removed))
    return removed


def write_identity(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(_identity(pid))
    os.replace(tmp, path)


def _identity(pid: int) -> str:
    return f"{pid} {psutil.Process(pid).create_time():.3f}\n"


def _process_of(path: Path) -> psutil.Process | None:
    try:
        pid_text, created = path.read_text().split()
        proc = psutil.Process(int(pid_text))
        if abs(proc.create_time() - float(created)) < 0.01:
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _owner_alive(owner_file: Path) -> bool:
    if not owner_file.exists():
        # a folder without its owner file: either being created this instant, or half removed; judge by age
        try:
            return time.time() - owner_file.parent.stat().st_mtime < 60
        except OSError:
            return False
    return _process_of(owner_file) is not None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _project_path() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def _wait_for_exit(pid: int) -> None:
    """Block until `pid` exits: a pidfd where the kernel has them, else a poll twice a second."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while psutil.pid_exists(pid):
            time.sleep(0.5)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _reaper_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.namespace")
    parser.add_argument("--reap", required=True, type=Path, help="the namespace root to clean when its owner dies")
    parser.add_argument("--owner", required=True, type=int)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the owner shut down cleanly and did it all itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_exit(args.owner)
    reap(args.reap, SHM_BASE / args.reap.name)


if __name__ == "__main__":
    _reaper_main()
