"""A request inside the engine (rank 0): its rows, one per prompt, and where each row stands."""
from dataclasses import dataclass, field

import torch

from serving.engine.detokenize import Sequence
from serving.engine.formats import Answers
from serving.schemas import GenerationParameters


@dataclass(eq=False)
class Request:
    id: int
    params: GenerationParameters
    stream: bool
    as_list: bool  # the body's inputs was a list: the answer is a list too
    deadline: float  # time.monotonic() past which it is answered 504 and dropped
    rows: list["Row"] = field(default_factory=list)
    answers: Answers | None = None  # its stream events and answer, in LMI's or TGI's shape (formats.py)

    @property
    def done(self) -> bool:
        return all(row.done for row in self.rows)


@dataclass(eq=False)
class Row:
    """One prompt of a request and its generation. It owns a slot of the cache from admission to its end."""

    request: Request
    prompt_ids: list[int]
    sequence: Sequence
    generator: torch.Generator | None
    slot: int | None = None
    cached: int = 0  # tokens whose keys and values are in the slot
    fed: int | None = None  # where its last sampled token is in Engine.sampled, to feed the next step
    ending: str | None = None  # why the last sampled token ends the row (known before it is detokenised)
    prompt_log_probs: list[float] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.sequence.finish is not None

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.sequence.ids
