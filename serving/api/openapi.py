"""GET /openapi.json: the API described from the same pydantic models that validate requests, so the
document cannot drift from what the server accepts."""
from aiohttp import web
from pydantic.json_schema import models_json_schema

from serving.api.openai import ChatCompletionRequest, CompletionRequest
from serving.schemas import ErrorBody, GenerateRequest, Generation, StreamToken, TGIError, TGIGenerateRequest

routes = web.RouteTableDef()
MODELS = [GenerateRequest, Generation, StreamToken, ErrorBody, CompletionRequest, ChatCompletionRequest,
          TGIGenerateRequest, TGIError]
TGI_ERRORS = {"400": "malformed body", "404": "unknown model, or several served and no ?model_name=",
              "422": "invalid parameters", "424": "the handler failed", "429": "queue full",
              "503": "model not ready", "504": "predict_timeout passed"}
ERRORS = {"400": "malformed body", "404": "unknown model", "422": "invalid parameters",
          "424": "the handler failed", "503": "model not ready or queue full", "504": "predict_timeout passed"}


def ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_body(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def inference_operation(summary: str, extra_parameters: list[dict]) -> dict:
    return {"post": {
        "summary": summary,
        "parameters": extra_parameters,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref(GenerateRequest)},
            "text/plain": {"schema": {"type": "string", "minLength": 1}}}},
        "responses": {
            "200": {"description": "generated text; a list for a list of inputs; jsonlines or SSE when streamed",
                    "content": {"application/json": {"schema": {"oneOf": [ref(Generation),
                                                                          {"type": "array", "items": ref(Generation)}]}},
                                "application/jsonlines": {"schema": ref(StreamToken)},
                                "text/event-stream": {"schema": ref(StreamToken)}}},
            **{code: {"description": text, **json_body(ref(ErrorBody))} for code, text in ERRORS.items()}}}}


def openai_operation(summary: str, model) -> dict:
    return {"post": {"summary": summary, "requestBody": {"required": True, **json_body(ref(model))},
                     "responses": {"200": {"description": "OpenAI response object, or SSE chunks ending in [DONE]",
                                           **json_body({"type": "object"})},
                                   "default": {"description": "OpenAI error object", **json_body({"type": "object"})}}}}


def tgi_operation(summary: str, answer: str) -> dict:
    """Hugging Face TGI's routes: TGI's body and its {"error", "error_type"} errors."""
    model_query = [{"name": "model_name", "in": "query", "required": False, "schema": {"type": "string"}}]
    return {"post": {"summary": summary, "parameters": model_query,
                     "requestBody": {"required": True, **json_body(ref(TGIGenerateRequest))},
                     "responses": {"200": {"description": answer, "content": {
                         "application/json": {"schema": {"type": ["object", "array"]}},
                         "text/event-stream": {"schema": {"type": "string"}}}},
                         **{code: {"description": text, **json_body(ref(TGIError))} for code, text in TGI_ERRORS.items()}}}}


def get_operation(summary: str, parameters: list[dict] | None = None) -> dict:
    return {"get": {"summary": summary, "parameters": parameters or [],
                    "responses": {"200": {"description": "ok", **json_body({"type": "object"})},
                                  "default": {"description": "error", **json_body({"type": "object"})}}}}


def management_operation(method: str, summary: str, parameters: list[dict] | None = None) -> dict:
    """A change to what is served: from loopback, or with Authorization: Bearer $TPSERVE_API_KEY."""
    return {method: {"summary": summary, "parameters": parameters or [],
                     "responses": {"200": {"description": "done", **json_body({"type": "object"})},
                                   "202": {"description": "scheduled (synchronous=false)"},
                                   **{code: {"description": text, **json_body(ref(ErrorBody))} for code, text in
                                      {"400": "bad parameter or url", "401": "token missing or wrong",
                                       "403": "not from loopback", "404": "unknown model or version",
                                       "409": "exists already, or not enough GPUs",
                                       "503": "the server is draining"}.items()}}}}


def build_document() -> dict:
    _, definitions = models_json_schema([(model, "validation") for model in MODELS],
                                        ref_template="#/components/schemas/{model}")
    model_path = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    version_path = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]
    model_query = [{"name": "model_name", "in": "query", "required": False, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "tpserve", "version": "0.1.0"},
        "paths": {
            "/predictions/{model}": inference_operation("Generate with a model (DJL/LMI body or text)", model_path),
            "/predictions/{model}/{version}": inference_operation("Generate with one version of a model",
                                                                  model_path + version_path),
            "/invocations": inference_operation("Generate with the only model, or ?model_name=", model_query),
            "/v1/completions": openai_operation("OpenAI completions", CompletionRequest),
            "/v1/chat/completions": openai_operation("OpenAI chat completions", ChatCompletionRequest),
            "/v1/models": get_operation("OpenAI model list"),
            "/": tgi_operation("TGI: generate (stream=false: a list of one answer) or stream (stream=true)",
                               "[{generated_text, details}], or SSE events"),
            "/generate": tgi_operation("TGI: generate", "{generated_text, details}"),
            "/generate_stream": tgi_operation("TGI: stream tokens as Server-Sent Events", "SSE events"),
            "/info": get_operation("TGI: the model and the server's limits", model_query),
            "/health": get_operation("TGI: 200 when every model is ready, else 503"),
            "/ping": get_operation("200 when every model is ready, else 503 (DJL's shape)"),
            "/health/live": get_operation("200 while the front end serves HTTP"),
            "/health/ready": get_operation("200 when every model is ready and the server is not draining; else 503 "
                                           "with each worker group's state and load progress"),
            "/metrics": get_operation("Prometheus exposition (text/plain)"),
            "/models": {**get_operation("served model versions, paginated (limit, next_page_token)"),
                        **management_operation("post", "register a model folder from the model store (url, "
                                               "model_name, model_version, tensor_parallel_degree, min_worker, ...)")},
            "/models/{model}": {**get_operation("one model's default version, with the list of versions", model_path),
                                **management_operation("put", "scale to min_worker worker groups", model_path),
                                **management_operation("delete", "drain and unregister every version", model_path)},
            "/models/{model}/{version}": {
                **get_operation("one version's state and configuration", model_path + version_path),
                **management_operation("put", "scale this version", model_path + version_path),
                **management_operation("delete", "drain and unregister this version", model_path + version_path)},
        },
        "components": {"schemas": definitions["$defs"]},
    }


DOCUMENT = build_document()


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)
