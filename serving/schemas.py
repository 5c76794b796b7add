"""Request and response bodies, as pydantic models. The front end validates a request against these before
relaying it (a bad one gets 422 naming the field, and never reaches the ranks); the built-in handler parses
the same models on the rank side."""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1


class GenerationParameters(BaseModel):
    """LMI/TGI `parameters`. Unknown names are refused, so a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(30, ge=1, le=1_000_000)
    min_new_tokens: int = Field(0, ge=0, le=1_000_000)
    """Suppress the end-of-sequence token until this many tokens were generated (benchmarks force lengths)."""
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0)
    """0 means greedy, as in OpenAI's API."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 disables top-k."""
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=16)
    return_full_text: bool = False
    details: bool = False

    @field_validator("stop_sequences", mode="before")
    @classmethod
    def _one_stop_sequence(cls, value):
        return [value] if isinstance(value, str) else value


class GenerateRequest(BaseModel):
    """The DJL/LMI body: `{"inputs": "..." | ["...", ...], "parameters": {...}}`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str | Annotated[list[str], Field(min_length=1)]
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    log_prob: float


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "cancelled"]
    generated_tokens: int
    seed: int | None = None
    tokens: list[Token] = []


class Generation(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorBody(BaseModel):
    """Every error the inference API returns."""

    code: int
    type: str
    message: str
