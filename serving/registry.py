"""The models this server serves: name -> WorkerGroup, each with its state (LOADING, READY, FAILED, STOPPED)."""
import asyncio
import logging

from aiohttp import web

from serving.config import ModelConfig
from serving.namespace import Namespace
from serving.worker_group import WorkerGroup

log = logging.getLogger("tpserve.registry")


class UnknownModel(Exception):
    pass


class ModelRegistry:
    def __init__(self, configs: list[ModelConfig], space: Namespace | None = None):
        names = [config.name for config in configs]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"two model directories share the name {', '.join(sorted(duplicates))}: "
                             f"name them with -m NAME=PATH")
        self.space = space or Namespace()
        self.groups = {config.name: WorkerGroup(config, self.space) for config in configs}
        self._runs: list[asyncio.Task] = []

    def get(self, name: str) -> WorkerGroup:
        try:
            return self.groups[name]
        except KeyError:
            raise UnknownModel(f"model {name!r} is not served here (served: {', '.join(self.groups)})") from None

    def only(self) -> WorkerGroup:
        """The model /invocations uses when it names none."""
        if len(self.groups) != 1:
            raise UnknownModel(f"{len(self.groups)} models are served: name one with ?model_name= "
                               f"({', '.join(self.groups)})")
        return next(iter(self.groups.values()))

    def start(self) -> None:
        """Load every model in the background; each group restarts itself after a failure."""
        self._runs = [asyncio.create_task(group.run(), name=f"group-{name}") for name, group in self.groups.items()]

    async def stop(self) -> None:
        # The restart loops first, so none launches a group after its model was stopped.
        for run in self._runs:
            run.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        await asyncio.gather(*(group.stop() for group in self.groups.values()))

    def all_ready(self) -> bool:
        """Every model READY and none suspected (a late beat, no progress): what a readiness probe wants."""
        return all(group.state.value == "READY" and not group.suspect for group in self.groups.values())


REGISTRY = web.AppKey("registry", ModelRegistry)
