"""Tool calls in the Hermes format: how a model with a tool-capable chat template writes a call, the grammar
that forces one (tool_choice "required" or a named function), and how the text becomes OpenAI `tool_calls`.

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Qwen2.5 and Qwen3, Hermes 2 and 3 and SmolLM3 (among others) are trained on it; vLLM calls its parser
"hermes". tpserve parses this format only: a chat template that renders tools but never writes `<tool_call>`
is refused (400 naming `tools`) rather than guessed at. The front end parses (no model needed); the ranks
check templates and build grammars. Nothing here imports torch.
"""
import functools
import json
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NEWLINE = "\n"
# compact JSON with spaces after separators, the way these models write it; no free whitespace, so a small
# model cannot loop on newlines inside a forced object
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_PROBE = "tpserve_probe_function"


class ToolsUnsupported(ValueError):
    """The model's chat template cannot take tools (or writes calls in a format tpserve does not parse)."""


# --- rank side: the template and the grammar -----------------------------------------------------------
def check_template(tokenizer) -> None:
    """ToolsUnsupported unless the chat template renders tools and writes Hermes calls that decode as text."""
    reason = _template_problem(tokenizer)
    if reason:
        raise ToolsUnsupported(reason)


@functools.cache
def _template_problem(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    if not template:
        return "the model has no chat template"
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe,
                                                 add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template that fails on tools does not support them
        return f"the model's chat template fails with tools ({exc})"
    if _PROBE not in rendered:
        return "the model's chat template does not render tools (it has no tool support)"
    if OPEN not in template:
        return f"the model's chat template does not use the {OPEN} format, the only tool-call format tpserve parses"
    ids = tokenizer(OPEN + CLOSE, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids, skip_special_tokens=True) != OPEN + CLOSE:
        return f"the model's {OPEN} markers are special tokens, which the detokenizer drops"
    return None


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates read them: tool-call arguments as objects, not JSON text (as vLLM does)."""
    out = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        message.setdefault("content", "")
        for call in message.get("tool_calls", []):
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except ValueError:
                pass  # not JSON: the template gets the text
        out.append(message)
    return out


def call_schema(function: dict) -> dict:
    """The JSON object of one call to `function` (an OpenAI function definition)."""
    arguments = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def calls_grammar(functions: list[dict], parallel: bool, answer_schema: dict | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for one or more Hermes calls to `functions`; with answer_schema,
    either calls or a JSON answer to that schema (tool_choice auto with a response_format)."""
    body = {"anyOf": [call_schema(f) for f in functions]} if len(functions) > 1 else call_schema(functions[0])
    more = ' ("\\n" call)*' if parallel else ""
    lines = [f"calls: call{more}", f"call: {json.dumps(OPEN + NEWLINE)} body {json.dumps(NEWLINE + CLOSE)}",
             f"body: %json {json.dumps({**body, 'x-guidance': JSON_STYLE})}"]
    if answer_schema is None:
        return "\n".join(["start: calls", *lines])
    return "\n".join(["start: calls | answer", *lines,
                      f"answer: %json {json.dumps({**answer_schema, 'x-guidance': JSON_STYLE})}"])


# --- front end: text -> content and calls -------------------------------------------------------------
@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it


class ToolCallParser:
    """Splits generated text into content and calls, incrementally: `feed` each piece as it streams, then
    `finish`. Each returns a list of str (content to send) and ParsedCall. The same object parses a whole text
    (feed it once), so a streamed answer equals the unstreamed one. Content is trimmed of the whitespace around
    calls; a block that is not a call to a known function stays content."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buffer = ""
        self.inside = False
        self.started = False  # content was sent: leading whitespace is over
        self.spaces = ""  # whitespace held back until more content follows it
        self.after_call = False  # content resumes after a call: its whitespace goes, one newline separates

    def feed(self, text: str) -> list:
        self.buffer += text
        out: list = []
        while True:
            if not self.inside:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    self._content(self.buffer[:len(self.buffer) - keep], out)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                self._content(self.buffer[:at], out)
                self.buffer, self.inside = self.buffer[at + len(OPEN):], True
            else:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    return out
                block, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(CLOSE):], False
                self._block(block, closed=True, out=out)

    def finish(self) -> list:
        out: list = []
        if self.inside:  # the text ended inside a block (EOS before the closing tag, or max_tokens)
            self._block(self.buffer, closed=False, out=out)
        else:
            self._content(self.buffer, out)
        self.buffer, self.inside = "", False
        return out

    def _block(self, block: str, closed: bool, out: list) -> None:
        call = self._call(block)
        if call is None:
            self._content(OPEN + block + (CLOSE if closed else ""), out)
        else:
            out.append(call)
            self.spaces, self.after_call = "", True

    def _call(self, block: str) -> ParsedCall | None:
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))

    def _content(self, text: str, out: list) -> None:
        if not self.started or self.after_call:
            text = text.lstrip()
        if not text:
            return
        if self.started and self.after_call:
            self.spaces = "\n"
        self.started, self.after_call = True, False
        text, self.spaces = self.spaces + text, ""
        trimmed = text.rstrip()
        self.spaces = text[len(trimmed):]
        if trimmed:
            out.append(trimmed)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
