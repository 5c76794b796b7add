"""The models this server serves: name -> versions -> worker groups.

A ModelVersion is one model folder's configuration served by one or more WorkerGroups (replicas, each its own
`mpirun -np TP`); requests go to the least busy ready one. A model has a default version (the first
registered; when it leaves, the newest remaining), used when a request names none. Models come from the
command line at startup, or from the management API at run time.
"""
import asyncio
import logging
import os

from aiohttp import web

from serving.config import ModelConfig, visible_accelerators
from serving.namespace import Namespace
from serving.worker_group import GroupUnavailable, State, WorkerGroup

log = logging.getLogger("tpserve.registry")


class UnknownModel(Exception):
    pass


class ModelExists(Exception):
    pass


class NoDevices(Exception):
    """Not enough free GPUs for another worker group."""


class Devices:
    """The GPUs of this machine, handed out tensor_parallel_degree at a time so that worker groups do not
    share them. Without GPUs (a CPU machine) nothing is handed out and any number of groups may run."""

    def __init__(self, ids: list[str] | None = None):
        self.free = list(ids if ids is not None else visible_gpu_ids())
        self.total = len(self.free)

    def take(self, count: int, strict: bool) -> list[str] | None:
        """`count` GPUs for one group; None (all visible, shared) on a CPU machine, or when not `strict` and
        too few are free (startup models keep today's behaviour of sharing)."""
        if self.total == 0:
            return None
        if len(self.free) < count:
            if strict:
                raise NoDevices(f"{count} GPU(s) needed, {len(self.free)} of {self.total} free")
            return None
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def give_back(self, ids: list[str] | None) -> None:
        if ids:
            self.free = sorted(set(self.free) | set(ids), key=lambda d: (len(d), d))


def visible_gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(visible_accelerators())]


class ModelVersion:
    def __init__(self, config: ModelConfig, devices: Devices, required: bool, space: Namespace):
        self.config = config
        self.space = space
        self.groups: list[WorkerGroup] = []
        self.max_workers = 1
        self.draining = False
        self.startup = required
        self._devices = devices
        self._runs: dict[WorkerGroup, asyncio.Task] = {}

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def state(self) -> str:
        """READY while any group can take requests; DRAINING once unregistered; else the groups' state."""
        if self.draining:
            return "DRAINING"
        states = {group.state for group in self.groups}
        for state in (State.READY, State.LOADING, State.RESTARTING, State.FAILED):
            if state in states:
                return state.value
        return State.STOPPED.value

    @property
    def required(self) -> bool:
        """/health/ready waits for startup models, and for registered ones once they have been ready (a
        registration must not take the pod out of its load balancer)."""
        return self.startup or any(group.loaded_in is not None for group in self.groups)

    @property
    def suspect(self) -> str | None:
        """Why a ready model may be hanging (a late beat, no progress), when every ready group is suspected."""
        ready = [group for group in self.groups if group.state == State.READY]
        return ready[0].suspect if ready and all(group.suspect for group in ready) else None

    @property
    def error(self) -> str | None:
        return next((group.error for group in self.groups if group.error), None)

    @property
    def restarts(self) -> int:
        return sum(group.restarts for group in self.groups)

    def pick(self) -> WorkerGroup:
        """The ready group with the fewest requests in flight; GroupUnavailable (503) when none is ready."""
        ready = [group for group in self.groups if group.state == State.READY]
        if self.draining or not ready:
            reason = "being unregistered" if self.draining else self.state.lower()
            raise GroupUnavailable(f"model {self.name} version {self.version} is {reason}"
                                   + (f": {self.error}" if self.error and not self.draining else ""))
        return min(ready, key=lambda group: len(group.requests))

    # --- worker groups -------------------------------------------------------------------------
    def scale(self, count: int, strict: bool = True) -> list[WorkerGroup]:
        """Start groups until `count` run (raises NoDevices first if the GPUs are short); returns the new
        groups. Fewer: see `shrink`."""
        needed = count - len(self.groups)
        if strict and self._devices.total and needed * self.config.world_size > len(self._devices.free):
            raise NoDevices(f"model {self.name}: {needed} more group(s) of tensor_parallel_degree="
                            f"{self.config.world_size} need {needed * self.config.world_size} GPU(s), "
                            f"{len(self._devices.free)} of {self._devices.total} are free")
        added = []
        for _ in range(needed):
            group = WorkerGroup(self.config, self.space, self._devices.take(self.config.world_size, strict))
            self.groups.append(group)
            self._runs[group] = asyncio.create_task(group.run(), name=f"group-{self.name}-{self.version}")
            added.append(group)
        return added

    async def shrink(self, count: int) -> None:
        """Stop groups beyond `count`, newest first, each after its requests in flight are answered."""
        retiring, self.groups = self.groups[count:], self.groups[:count]
        await asyncio.gather(*(self._retire(group) for group in retiring))

    async def wait_loaded(self, groups: list[WorkerGroup], timeout: float) -> bool:
        """Until each of `groups` has left LOADING; True when all are READY."""
        async with asyncio.timeout(timeout):
            while any(group.state == State.LOADING for group in groups):
                await asyncio.sleep(0.1)
        return all(group.state == State.READY for group in groups)

    async def drain_and_stop(self) -> None:
        """Refuse new requests, let those in flight finish (up to predict_timeout), then stop every group."""
        self.draining = True
        await self.shrink(0)
        await self.stop()

    async def stop(self) -> None:
        # The restart loops first, so none launches a group after its model was stopped.
        runs = [self._runs.pop(group) for group in list(self._runs)]
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        groups, self.groups = self.groups, []
        await asyncio.gather(*(group.stop() for group in groups))
        for group in groups:
            self._devices.give_back(group.devices)

    async def _retire(self, group: WorkerGroup) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.predict_timeout
        while group.requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        run = self._runs.pop(group, None)
        if run is not None:  # the restart loop first, so it cannot launch the group again
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        await group.stop()
        self._devices.give_back(group.devices)


class ModelRegistry:
    def __init__(self, configs: list[ModelConfig], devices: Devices | None = None, space: Namespace | None = None):
        self.devices = devices or Devices()
        self.space = space or Namespace()
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.defaults: dict[str, str] = {}
        self.retiring: set[ModelVersion] = set()  # unregistered, still draining
        for config in configs:
            if config.version in self.models.get(config.name, {}):
                raise ValueError(f"two model directories share the name {config.name} (version {config.version}): "
                                 f"name them with -m NAME=PATH")
            self._add(config, required=True)

    # --- lookups -------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise UnknownModel(f"model {name!r} is not served here (served: {', '.join(self.models) or 'none'})")
        if version is None:
            return versions[self.defaults[name]]
        try:
            return versions[version]
        except KeyError:
            raise UnknownModel(f"model {name!r} has no version {version!r} (versions: "
                               f"{', '.join(versions)})") from None

    def only(self) -> ModelVersion:
        """The model /invocations uses when it names none."""
        if len(self.models) != 1:
            raise UnknownModel(f"{len(self.models)} models are served: name one with ?model_name= "
                               f"({', '.join(self.models)})")
        return self.get(next(iter(self.models)))

    def versions(self) -> list[ModelVersion]:
        """Every served model version, models in registration order, default version first."""
        return [entry for name in self.models for entry in self.versions_of(name)]

    def versions_of(self, name: str) -> list[ModelVersion]:
        versions = self.models.get(name, {})
        default = self.defaults.get(name)
        return sorted(versions.values(), key=lambda v: v.version != default)

    @property
    def groups(self) -> dict[str, ModelVersion]:
        """Each model's default version by name (what the OpenAI API lists)."""
        return {name: self.get(name) for name in self.models}

    def all_ready(self) -> bool:
        """Every required model READY and none suspected of hanging: what a readiness probe wants."""
        return all(entry.state == "READY" and not entry.suspect for entry in self.versions() if entry.required)

    # --- changes -------------------------------------------------------------------------------
    def add(self, config: ModelConfig) -> ModelVersion:
        """Register a model version at run time; its groups start with `scale`."""
        if config.version in self.models.get(config.name, {}):
            raise ModelExists(f"model {config.name} version {config.version} is already registered")
        return self._add(config, required=False)

    def _add(self, config: ModelConfig, required: bool) -> ModelVersion:
        entry = ModelVersion(config, self.devices, required, self.space)
        self.models.setdefault(config.name, {})[config.version] = entry
        self.defaults.setdefault(config.name, config.version)
        return entry

    async def remove(self, name: str, version: str | None = None) -> list[ModelVersion]:
        """Unregister one version, or every version of a model: each drains, then stops."""
        entries = [self.get(name, version)] if version is not None else list(self.models.get(name, {}).values())
        if not entries:
            raise UnknownModel(f"model {name!r} is not served here")
        for entry in entries:
            entry.draining = True
            self._forget(entry)
            self.retiring.add(entry)
        try:
            await asyncio.gather(*(entry.drain_and_stop() for entry in entries))
        finally:
            self.retiring.difference_update(entries)
        return entries

    def _forget(self, entry: ModelVersion) -> None:
        """Out of the lookups at once (the default moves to the newest remaining version); requests that
        already hold it finish."""
        versions = self.models[entry.name]
        del versions[entry.version]
        if not versions:
            del self.models[entry.name]
            del self.defaults[entry.name]
        elif self.defaults[entry.name] == entry.version:
            self.defaults[entry.name] = list(versions)[-1]

    def start(self) -> None:
        """Load every startup model in the background; each group restarts itself after a failure."""
        for entry in self.versions():
            entry.scale(1, strict=False)

    async def stop(self) -> None:
        await asyncio.gather(*(entry.stop() for entry in self.versions() + list(self.retiring)))


REGISTRY = web.AppKey("registry", ModelRegistry)
