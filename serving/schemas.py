"""Request and response bodies, as pydantic models. The front end validates a request against these before
relaying it (a bad one gets 422 naming the field, and never reaches the ranks); the built-in handler parses
the same models on the rank side."""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1
# Bounds that keep one request from holding a group for minutes (issue 9): a request above them gets 422 in
# the front end and never reaches the ranks.
MAX_NEW_TOKENS = 32_768
MAX_PROMPTS = 32  # prompts in one request (a list of inputs / prompt)
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 512
Prompt = Annotated[str, Field(min_length=1)]
StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
# every model refuses NaN and +-Infinity (Python's json accepts them)
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerationParameters(BaseModel):
    """LMI/TGI `parameters`. Unknown names are refused, so a typo is not silently ignored."""

    model_config = STRICT

    max_new_tokens: int = Field(30, ge=1, le=MAX_NEW_TOKENS)
    min_new_tokens: int = Field(0, ge=0, le=MAX_NEW_TOKENS)
    """Suppress the end-of-sequence token until this many tokens were generated (benchmarks force lengths)."""
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    """0 means greedy, as in OpenAI's API."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    """0 disables top-k."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop_sequences: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    include_stop_str_in_output: bool = True
    """Keep a matched stop sequence at the end of the text (TGI/LMI do; the OpenAI API does not)."""
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    """With details: the prompt's tokens and their log-probabilities (`details.prefill`)."""
    top_n_tokens: int = Field(0, ge=0, le=20)
    """With details: the n most likely tokens at each step (`details.top_tokens`)."""

    @field_validator("stop_sequences", mode="before")
    @classmethod
    def _one_stop_sequence(cls, value):
        return [value] if isinstance(value, str) else value


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """The DJL/LMI body: `{"inputs": "..." | ["...", ...], "parameters": {...}, "stream": false}`, or
    `{"messages": [{"role", "content"}, ...], ...}` to have the model's chat template applied."""

    model_config = STRICT

    inputs: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if (self.inputs is None) == (self.messages is None):
            raise ValueError("give exactly one of inputs and messages")
        if self.stream and isinstance(self.inputs, list):
            raise ValueError("stream needs a single input, not a list")
        return self


class Token(BaseModel):
    id: int
    text: str
    log_prob: float


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "cancelled", "error"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = None
    prefill: list[Token] | None = None


class StreamToken(BaseModel):
    """One line of a jsonlines stream (one `data:` event of an SSE stream). `token.text` is the text this token
    adds, so the texts of all lines concatenate to generated_text; the last line also has generated_text and
    details."""

    token: Token | None = None
    generated_text: str | None = None
    details: Details | None = None
    error: str | None = None


class Generation(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorBody(BaseModel):
    """Every error the inference API returns."""

    code: int
    type: str
    message: str
