"""Read what a Dockerfile's final stage gives a container at run time: ENTRYPOINT, CMD, ENV, USER, WORKDIR,
EXPOSE, HEALTHCHECK. Enough of the Dockerfile syntax for ours (exec-form JSON, `\\` continuations, `#`
comments, ENV key=value pairs with $VAR expansion), so tests can compare variants and run the command."""
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# The python:*-slim base images' own PATH, which `ENV PATH=/opt/venv/bin:$PATH` extends.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Runtime:
    base: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    workdir: str = "/"
    expose: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return self.entrypoint + self.cmd


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        result.append((word.upper(), rest.strip()))
        current = ""
    return result


def runtime(path: Path) -> Runtime:
    """The final stage's run-time settings (a FROM starts over; ARGs before the first FROM fill FROM lines)."""
    args: dict[str, str] = {}
    stage = Runtime()
    for word, rest in instructions(path):
        if word == "ARG" and not stage.base:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            stage = Runtime(base=expand(rest.split()[0], args))
            stage.env = {}
        elif word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                stage.env[name] = expand(value, {"PATH": BASE_PATH, **stage.env})
        elif word == "ENTRYPOINT":
            stage.entrypoint, stage.cmd = json.loads(rest), []  # a new ENTRYPOINT resets CMD
        elif word == "CMD":
            stage.cmd = json.loads(rest)
        elif word == "USER":
            stage.user = rest
        elif word == "WORKDIR":
            stage.workdir = rest
        elif word == "EXPOSE":
            stage.expose += rest.split()
        elif word == "HEALTHCHECK":
            options, _, command = rest.partition("CMD")
            stage.healthcheck = json.loads(command)
            stage.healthcheck_options = dict(option.lstrip("-").split("=", 1) for option in options.split())
    return stage


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), ""), value)
