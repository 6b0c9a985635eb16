"""Request models of the Ollama (`/api/*`) and OpenAI-compatible (`/v1/*`) APIs, and their error shapes.

Types are strict (a string is not a number, `"yes"` is not true) except where Ollama is lenient: an
integer option may come as a JSON float with no fraction (`top_k: 40.0`), and null means absent.
Every sampling option is honoured (serve/options.py), Ollama's hardware knobs are accepted (they do not
change a reply), and the sampling methods gptcore lacks are accepted only at their neutral value. A field
gptcore does not know, top-level or in `options`, is not used: by default the reply lists it in a
`Warning` header (Ollama ignores unknown fields too, and a web page cannot change what it sends), and
`gptcore serve --strict-options` refuses it (400 naming it). The request being answered says which
through `FIELDS` (set by serve/http_io.py's FieldCheck for each request).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class RequestError(Exception):
    """A request the server refuses: HTTP status and one clear message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _integral(value: Any) -> Any:
    """40.0 -> 40, as Ollama's option parsing accepts; anything else is left to the strict int check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]
Stop = str | list[str]  # evaluated at runtime: `X | Y` of types needs Python 3.10, as required


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


Number = Annotated[float, BeforeValidator(lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


# The request being answered: {"strict": refuse unknown fields, "unknown": those seen}; None outside one.
FIELDS: ContextVar[dict | None] = ContextVar("gptcore_request_fields", default=None)


class Options(_Model):
    """Ollama's `options` (api/types.go Options + Runner): docs/serving.md says what each does here."""

    temperature: Number | None = None
    top_k: Int | None = None
    top_p: Number | None = None
    min_p: Number | None = None
    typical_p: Number | None = None
    repeat_penalty: Number | None = None
    repeat_last_n: Int | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    seed: Int | None = None
    num_predict: Int | None = None
    num_ctx: Int | None = None  # at most the model's context: a smaller one cuts prompt and reply sooner
    num_keep: Int | None = None  # prompt tokens kept from its start when it is cut to fit
    stop: Stop | None = None
    mirostat: Int | None = None  # the three below: only their neutral values (serve/options.py)
    tfs_z: Number | None = None
    penalize_newline: bool | None = None
    mirostat_tau: Number | None = None  # used by mirostat only
    mirostat_eta: Number | None = None
    # hardware knobs of Ollama's runner: accepted, they do not change a reply
    num_batch: Int | None = None
    num_gpu: Int | None = None
    main_gpu: Int | None = None
    num_thread: Int | None = None
    low_vram: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    vocab_only: bool | None = None


class Message(_Model):
    role: str
    content: str | None = None
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None  # an assistant's earlier tool calls (serve/tools.py)
    tool_name: str | None = None  # which tool a tool message answers (the call before it says)
    thinking: str | None = None  # an earlier reply's thinking: gptcore models do not think, it is not rendered


Format = Literal["", "json"] | dict[str, Any]


class _Generation(_Model):
    model: str | None = None
    name: str | None = None  # older clients send `name`
    stream: bool = True
    options: Options | None = None
    format: Format | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise RequestError(400, "model is required")
        return name


class GenerateRequest(_Generation):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ChatRequest(_Generation):
    messages: list[Message] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None  # OpenAI's, on Ollama's route too (serve/tools.py)


class ShowRequest(_Model):
    model: str | None = None
    name: str | None = None


class EmbedRequest(_Model):
    model: str | None = None
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: Int | None = None  # keep the first N components (0: all), as Ollama
    keep_alive: str | int | float | None = None
    options: Options | None = None


class LegacyEmbeddingsRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    keep_alive: str | int | float | None = None
    options: Options | None = None


class PullRequest(_Model):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool | None = None  # no registry is reached: nothing to verify


class CreateRequest(_Model):
    """Ollama's /api/create (serve/models_routes.py says which forms gptcore serves)."""

    model: str | None = None
    name: str | None = None
    from_: str | None = Field(None, alias="from")
    system: str | None = None
    template: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    adapters: dict[str, Any] | None = None
    messages: list[Any] | None = None
    modelfile: str | None = None
    quantize: str | None = None
    stream: bool = True

    def model_name(self) -> str:
        if not (self.model or self.name):
            raise RequestError(400, "model is required")
        return self.model or self.name


class CopyRequest(_Model):
    source: str | None = None
    destination: str | None = None


# -- OpenAI ---------------------------------------------------------------------------------------------
class OpenAIMessage(_Model):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None  # which call a tool message answers (the call before it says)
    name: str | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class _OpenAIGeneration(_Model):
    model: str
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    top_k: Int | None = None  # the extras llama.cpp's and vLLM's OpenAI servers take
    min_p: Number | None = None
    typical_p: Number | None = None
    repeat_penalty: Number | None = None
    repetition_penalty: Number | None = None
    repeat_last_n: Int | None = None
    keep_alive: str | int | float | None = None  # Ollama's, on its OpenAI routes too
    seed: Int | None = None
    stop: Stop | None = None
    n: Int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_OpenAIGeneration):
    messages: list[OpenAIMessage]
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # gptcore makes at most one call per reply either way
    logprobs: bool | None = None
    top_logprobs: Int | None = None


class CompletionRequest(_OpenAIGeneration):
    prompt: str | list[str] | list[Int] | list[list[Int]]  # text, or token ids
    echo: bool = False
    best_of: Int | None = None
    suffix: str | None = None
    logprobs: Int | None = None  # the legacy API's: how many alternatives (0-5) besides each token


class EmbeddingsRequest(_Model):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default
    dimensions: Int | None = None


def parse(model: type[_Model], body: Any) -> Any:
    """body (decoded JSON) as `model`, or RequestError(400) naming the first wrong field; fields it does
    not know (top-level and in `options`) are listed for the Warning header, or refused under FIELDS' strict."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = _unknown(model, body)
    if isinstance(body.get("options"), dict) and "options" in model.model_fields:
        unknown += [f"options.{k}" for k in _unknown(Options, body["options"])]
    fields = FIELDS.get()
    if unknown and fields is not None:
        if fields["strict"]:
            raise RequestError(
                400,
                f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)[:300]}: "
                "gptcore does not use it (the server runs with --strict-options)",
            )
        fields["unknown"] += unknown
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ""
        for part in first["loc"]:
            if isinstance(part, int):
                where += f"[{part}]"
            elif not any(c in part for c in "[]'-") and part not in _TYPE_TAGS:  # a union's branch tag is no field
                where += f".{part}" if where else part
        message = first["msg"][0].lower() + first["msg"][1:]
        if first["type"] != "missing":
            value = first.get("input")
            message += f", got {repr(value)[:60] if not isinstance(value, dict) else 'an object'}"
        raise RequestError(400, f"invalid {where or 'body'}: {message}") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _unknown(model: type[BaseModel], body: dict) -> list[str]:
    known = {f.alias or name for name, f in model.model_fields.items()}
    return [str(k)[:60] for k in body if k not in known]


def parse_options(options: Any, where: str) -> Options:
    """Ollama options given where no reply can warn (/api/create's parameters): every key known, or a 400."""
    if not isinstance(options, dict):
        raise RequestError(400, f"invalid {where}: expected an object")
    unknown = _unknown(Options, options)
    if unknown:
        raise RequestError(400, f"invalid {where}: unknown parameter {unknown[0]!r}")
    try:
        return Options.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        raise RequestError(400, f"invalid {where}.{first['loc'][0]}: {first['msg'].lower()}") from None


def ollama_error(message: str) -> dict:
    return {"error": message}


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    kind = {
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
