"""Request and response bodies, as pydantic models. The front end validates a request against these before
relaying it (a bad one gets 422 naming the field, and never reaches the ranks); the built-in handler parses
the same models on the rank side."""
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

MAX_SEED = 2**63 - 1
# Bounds that keep one request from holding a group for minutes (issue 9): a request above them gets 422 in
# the front end and never reaches the ranks.
MAX_NEW_TOKENS = 32_768
MAX_PROMPTS = 32  # prompts in one request (a list of inputs / prompt)
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 512
MAX_BEST_OF = 4  # sequences sampled for one prompt with best_of (each takes a row of the batch)
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
MAX_TOOLS = 128
MAX_PROMPT_TOKENS = 1_000_000  # token ids in one prompt given as ids
Prompt = Annotated[str, Field(min_length=1)]
StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]
# every model refuses NaN and +-Infinity (Python's json accepts them)
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _nulls_are_defaults(data: Any) -> Any:
    """An explicit JSON null means "the default", as TGI and its clients use it (they send every field)."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data


class GenerationParameters(BaseModel):
    """LMI/TGI `parameters`. Unknown names are refused, so a typo is not silently ignored; a null is the
    default."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_are_defaults(data)

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
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's definition (TGI's name): each token's logit is lowered by frequency_penalty times the number of
    times it was generated so far."""
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    """Typical decoding (TGI): keep the tokens whose information is closest to the distribution's entropy, up to
    this much probability mass; 1.0 disables it."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop_sequences: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    """TGI's name for stop_sequences; both may be given and every one of them stops."""
    include_stop_str_in_output: bool = True
    """Keep a matched stop sequence at the end of the text (TGI/LMI do; the OpenAI API does not)."""
    truncate: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS * 32)
    """Keep only the last `truncate` tokens of the prompt (TGI)."""
    best_of: int = Field(1, ge=1, le=MAX_BEST_OF)
    """Sample this many sequences and answer with the one of highest total log-probability; the others are in
    details.best_of_sequences (TGI). Needs sampling and a single, unstreamed input."""
    watermark: bool = False
    """TGI's watermarking: not supported (true is refused)."""
    adapter_id: Any = None
    """TGI's LoRA adapter: not supported (only null is accepted)."""
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    """With details: the prompt's tokens and their log-probabilities (`details.prefill`)."""
    top_n_tokens: int = Field(0, ge=0, le=20)
    """With details: the n most likely tokens at each step (`details.top_tokens`)."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens: the end-of-sequence token is held back and never ends the text."""
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    """Tokens that end the text as the end-of-sequence token does (also held back until min_new_tokens)."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's: subtracted once from the logit of every token generated so far."""
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS)
    """Token id -> a value added to its logit before sampling (OpenAI's logit_bias; -100 forbids, 100 forces)."""
    grammar: "Grammar | None" = None
    """Constrain the text to a JSON schema or a regular expression (TGI's `grammar`)."""
    clip_to_context: bool = False
    """Generate at most up to the end of the context instead of refusing a max_new_tokens that does not fit
    (what OpenAI chat does without max_tokens)."""

    @field_validator("stop_sequences", "stop", mode="before")
    @classmethod
    def _one_stop_sequence(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("watermark", "adapter_id")
    @classmethod
    def _unsupported(cls, value, info):
        if value not in (None, False):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @model_validator(mode="after")
    def _tgi_names(self):
        merged = self.stop_sequences + [stop for stop in self.stop if stop not in self.stop_sequences]
        if len(merged) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop and stop_sequences: at most {MAX_STOP_SEQUENCES} stop sequences in all")
        self.stop_sequences, self.stop = merged, []
        if self.best_of > 1 and not self.sampling:
            raise ValueError("best_of > 1 needs sampling (do_sample true and a temperature above 0)")
        return self

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_ids_from_json_keys(cls, value):
        """JSON object keys are strings: "123" names token 123."""
        if isinstance(value, dict):
            return {int(key) if isinstance(key, str) and key.isdigit() else key: bias for key, bias in value.items()}
        return value


class Grammar(BaseModel):
    """TGI's shape: `{"type": "json", "value": <JSON schema>}` or `{"type": "regex", "value": "<pattern>"}`."""

    model_config = STRICT

    type: Literal["json", "regex"]
    value: dict[str, Any] | str

    @model_validator(mode="after")
    def _value_fits_type(self):
        if (self.type == "json") != isinstance(self.value, dict):
            raise ValueError("a json grammar's value is a JSON schema (an object); a regex grammar's is a string")
        return self


class FunctionDefinition(BaseModel):
    """One tool, as OpenAI describes it (and chat templates expect it)."""

    model_config = STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema for the arguments; absent means no arguments."""
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str
    arguments: str
    """The arguments as a JSON text (OpenAI's form)."""


class ToolCall(BaseModel):
    model_config = STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    """Call this function (and nothing else)."""

    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(BaseModel):
    """One message for the chat template. Tool calls and tool results need a template that renders them."""

    model_config = STRICT

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class GenerateRequest(BaseModel):
    """The DJL/LMI body: `{"inputs": "..." | ["...", ...], "parameters": {...}, "stream": false}`, or
    `{"messages": [{"role", "content"}, ...], ...}` to have the model's chat template applied, or
    `{"input_ids": [ids] | [[ids], ...]}` for prompts already tokenised. With messages, `tools` go to the chat
    template and `tool_choice` decides whether the model may (auto), must (required, or a named function) or
    may not (none) call one; serving/tools.py has the format."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_are_defaults(data)

    inputs: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] | None = None
    input_ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[ToolDefinition], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    """False: at most one tool call (a forced call is exactly one)."""
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if sum(source is not None for source in (self.inputs, self.input_ids, self.messages)) != 1:
            raise ValueError("give exactly one of inputs, input_ids and messages")
        if self.stream and (isinstance(self.inputs, list) or self.several_id_prompts):
            raise ValueError("stream needs a single input, not a list")
        if self.parameters.best_of > 1 and (self.stream or isinstance(self.inputs, list)):
            raise ValueError("parameters.best_of > 1 needs a single input and no stream")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools need messages (the chat template renders them)")
        if self.tool_choice != "auto" and self.tools is None:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                tool.function.name for tool in self.tools}:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        return self

    @property
    def several_id_prompts(self) -> bool:
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    @property
    def as_list(self) -> bool:
        """The prompts came as a list: the answer is a list too."""
        return isinstance(self.inputs, list) or self.several_id_prompts


GenerationParameters.model_rebuild()


def finite(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: a log-probability that is not a finite number (the first prompt token's, or
    one of a token a filter removed) is sent as null."""
    return value if value is not None and math.isfinite(value) else None


TGI_MAX_NEW_TOKENS = 100  # TGI 3.x's default
TGI_WARPERS = ("temperature", "top_k", "top_p", "typical_p")


class TGIGenerateRequest(BaseModel):
    """Hugging Face TGI's body (POST /generate, /generate_stream, and `/` with `stream`): one prompt, TGI's
    defaults. As TGI does, max_new_tokens defaults to 100 and giving temperature, top_k, top_p or typical_p turns
    sampling on (temperature 0 stays greedy here, where TGI refuses it)."""

    model_config = STRICT

    inputs: Prompt
    parameters: GenerationParameters = Field(default_factory=lambda: GenerationParameters(
        max_new_tokens=TGI_MAX_NEW_TOKENS))
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _tgi_defaults(cls, data: Any) -> Any:
        data = _nulls_are_defaults(data)
        if isinstance(data, dict) and isinstance(data.get("parameters", {}), dict):
            parameters = _nulls_are_defaults(data.get("parameters", {}))
            parameters.setdefault("max_new_tokens", TGI_MAX_NEW_TOKENS)
            if parameters.get("temperature") != 0 and any(key in parameters for key in TGI_WARPERS):
                parameters["do_sample"] = True
            data = {**data, "parameters": parameters}
        return data


class TGIError(BaseModel):
    """Every error of the TGI routes (and of a model with option.tgi_compat), as TGI sends it: the body of an
    error response, or the last `data:` event of a stream that fails after it started."""

    error: str
    error_type: str


class Token(BaseModel):
    id: int
    text: str
    log_prob: float | None
    """null where there is none (the first prompt token) or it is not finite (a token a filter removed)."""

    @field_validator("log_prob")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return finite(value)

    @model_serializer(mode="wrap")
    def _log_prob_always(self, handler):
        data = handler(self)
        data.setdefault("log_prob", None)  # null, not left out, under exclude_none
        return data


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "cancelled", "error"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = None
    prefill: list[Token] | None = None
    best_of_sequences: list[dict] | None = None
    """With best_of > 1: the other sequences, each with generated_text and these details."""


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
