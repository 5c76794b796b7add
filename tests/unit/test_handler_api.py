"""What a handler sees and returns (Input, Output, hints) and the front end's checks on bodies and Outputs."""
import json

import pytest

from serving.api.inference import check_body, output_response
from serving.config import ModelConfig
from serving.frames import FROM_RANK, Batch, FrameBuffer, Response, encode
from serving.rank import hints
from serving.rank.comm import SoloComm
from serving.rank.inputs import Input
from serving.rank.outputs import Output


def request_input(body: bytes = b'{"inputs": "hi"}', **headers) -> Input:
    return Input(properties={"model_dir": "/m", "entryPoint": "model.py", **headers}, content={"data": body})


# --- Input ----------------------------------------------------------------------------------------------

def test_djl_module_names_give_the_same_classes():
    from djl_python.inputs import Input as DjlInput
    from djl_python.outputs import Output as DjlOutput
    import djl_python
    assert DjlInput is Input
    assert DjlOutput is Output
    assert djl_python.Input is Input and djl_python.Output is Output


def test_input_get_properties_returns_all():
    inp = request_input(**{"content-type": "application/json"})
    assert inp.get_properties() == {"model_dir": "/m", "entryPoint": "model.py", "content-type": "application/json"}


def test_input_get_property_is_case_insensitive_for_headers():
    inp = request_input(**{"content-type": "text/plain", "x-amzn-sagemaker-custom-attributes": "a=1"})
    assert inp.get_property("Content-Type") == "text/plain"
    assert inp.get_property("content-type") == "text/plain"
    assert inp.get_property("X-Amzn-SageMaker-Custom-Attributes") == "a=1"


def test_input_get_property_keeps_mixed_case_model_keys_and_default():
    inp = request_input()
    assert inp.get_property("entryPoint") == "model.py"
    assert inp.get_property("missing") is None
    assert inp.get_property("missing", "fallback") == "fallback"


def test_input_get_as_bytes_string_json_default_key():
    inp = request_input(b'{"inputs": "h\xc3\xa9"}')
    assert inp.get_as_bytes() == b'{"inputs": "h\xc3\xa9"}'
    assert inp.get_as_string() == '{"inputs": "hé"}'
    assert inp.get_as_json() == {"inputs": "hé"}


def test_input_get_as_with_key():
    inp = Input(content={"data": b"[1]", "extra": b'{"a": 2}'})
    assert inp.get_as_bytes("extra") == b'{"a": 2}'
    assert inp.get_as_string("extra") == '{"a": 2}'
    assert inp.get_as_json("extra") == {"a": 2}
    assert inp.get_as_json() == [1]


def test_input_get_as_bytes_without_data_uses_first_content():
    assert Input(content={"file": b"abc", "other": b"x"}).get_as_bytes() == b"abc"


def test_input_get_as_bytes_unknown_key_raises_key_error():
    with pytest.raises(KeyError, match="nope"):
        request_input().get_as_bytes("nope")


def test_input_get_as_bytes_without_content_raises():
    with pytest.raises(ValueError):
        Input().get_as_bytes()


def test_input_is_empty():
    assert Input().is_empty()
    assert Input(properties={"a": "b"}).is_empty()
    assert not request_input().is_empty()
    assert not Input(batch=[request_input(), request_input()]).is_empty()


def test_single_input_is_not_a_batch():
    inp = request_input()
    assert not inp.is_batch()
    assert inp.get_batch_size() == 1
    assert inp.get_batches() == [inp]


def test_batch_input():
    items = [request_input(b"1"), request_input(b"2"), request_input(b"3")]
    batch = Input(batch=items)
    assert batch.is_batch()
    assert batch.get_batch_size() == 3
    assert [item.get_as_bytes() for item in batch.get_batches()] == [b"1", b"2", b"3"]
    batch.get_batches().clear()  # a copy: the batch itself is unchanged
    assert batch.get_batch_size() == 3


def test_batch_of_one_is_not_a_batch():
    item = request_input()
    batch = Input(batch=[item])
    assert not batch.is_batch()
    assert batch.get_batches() == [item]


def test_input_is_cancelled_follows_callback():
    state = {"gone": False}
    inp = Input(content={"data": b"x"}, cancelled=lambda: state["gone"])
    assert not inp.is_cancelled()
    state["gone"] = True
    assert inp.is_cancelled()
    assert not Input().is_cancelled()


# --- Output ---------------------------------------------------------------------------------------------

def test_output_defaults():
    out = Output()
    assert (out.code, out.message, out.content, out.properties) == (200, "OK", [], {})


def test_output_add_bytes_kept_without_content_type():
    out = Output().add(b"\x00\xff")
    assert out.content == [("data", b"\x00\xff", None)]
    assert "content-type" not in out.properties


def test_output_add_str_is_utf8_without_content_type():
    out = Output().add("héllo")
    assert out.content == [("data", "héllo".encode(), None)]
    assert "content-type" not in out.properties


def test_output_add_object_is_json_with_content_type():
    out = Output().add({"generated_text": "é"}, key="result", batch_index=2)
    assert out.content == [("result", '{"generated_text": "é"}'.encode(), 2)]
    assert out.properties["content-type"] == "application/json"


def test_output_add_object_keeps_content_type_already_set():
    out = Output().add_property("Content-Type", "application/jsonlines").add([1, 2])
    assert out.properties["content-type"] == "application/jsonlines"


def test_output_add_as_json():
    out = Output().add_as_json("text")
    assert out.content == [("data", b'"text"', None)]
    assert out.properties["content-type"] == "application/json"


def test_output_add_property_lowercases_key_and_stringifies_value():
    out = Output().add_property("X-Request-Count", 3)
    assert out.properties == {"x-request-count": "3"}


def test_output_set_code_and_message():
    out = Output().set_code(201).set_message("Created")
    assert (out.code, out.message) == (201, "Created")


def test_output_chaining_returns_the_output():
    out = Output()
    assert out.set_code(200) is out
    assert out.set_message("OK") is out
    assert out.add_property("a", "b") is out
    assert out.add(b"x") is out
    assert out.add_as_json({}) is out
    assert out.add_stream_content(iter(())) is out
    assert out.error("e") is out


def test_output_error_fails_whole_request():
    out = Output().error("CUDA out of memory", code=500, message="inference failed")
    assert (out.code, out.message) == (500, "inference failed")
    (key, data, index), = out.content
    body = json.loads(data)
    assert (key, index) == ("data", None)
    assert body["code"] == 500
    assert body["message"] == "inference failed"
    assert body["error"] == "CUDA out of memory"
    assert out.properties["content-type"] == "application/json"


def test_output_error_default_code_is_424():
    out = Output().error("boom")
    assert out.code == 424
    assert json.loads(out.content[0][1])["error"] == "boom"


def test_output_error_with_batch_index_fails_only_that_item():
    out = Output().add({"ok": 0}, batch_index=0).error("bad item", code=400, message="bad", batch_index=1)
    assert out.code == 200
    first, second = out.for_item(0, 2), out.for_item(1, 2)
    assert (first["code"], first["message"]) == (200, "OK")
    assert (second["code"], second["message"]) == (400, "bad")
    assert json.loads(second["content"][0][1])["error"] == "bad item"
    assert first["content"] == [("data", b'{"ok": 0}')]


def test_output_add_stream_content_with_formatter():
    out = Output().add_stream_content(iter([1, 2, 3]), output_formatter=lambda item: f"<{item}>")
    assert list(out.stream_content) == ["<1>", "<2>", "<3>"]


def test_output_add_stream_content_without_formatter_keeps_stream():
    stream = iter(["a", "b"])
    assert Output().add_stream_content(stream).stream_content is stream


def test_for_item_single_request_takes_untagged_content():
    out = Output().add_property("X-A", "1").add(b"body")
    assert out.for_item(0, 1) == {"code": 200, "message": "OK", "properties": {"x-a": "1"},
                                  "content": [("data", b"body")]}


def test_for_item_batch_takes_only_entries_of_that_index():
    out = Output().add("a", batch_index=0).add("b", batch_index=1).add("c", batch_index=0)
    assert out.for_item(0, 2)["content"] == [("data", b"a"), ("data", b"c")]
    assert out.for_item(1, 2)["content"] == [("data", b"b")]


def test_for_item_batch_skips_untagged_content():
    out = Output().add("untagged").add("mine", batch_index=1)
    assert out.for_item(0, 2)["content"] == []
    assert out.for_item(1, 2)["content"] == [("data", b"mine")]


# --- SoloComm -------------------------------------------------------------------------------------------

def test_solo_comm_is_one_rank():
    comm = SoloComm()
    assert (comm.rank, comm.size) == (0, 1)
    assert comm.broadcast(Batch(1, [])) is None
    assert comm.gather("x") == ["x"]
    with pytest.raises(RuntimeError):
        comm.receive()


# --- hints ----------------------------------------------------------------------------------------------

def test_hint_for_fp16_on_cpu():
    text = hints.explain(ValueError("Data type torch.float16 is not supported by cpu accelerator"))
    assert "torch.float32" in text
    assert text.endswith("(original error: ValueError: Data type torch.float16 is not supported by cpu accelerator)")


def test_hint_for_kernel_inject_on_cpu():
    text = hints.explain(ValueError("This op had not been implemented on CPU backend."))
    assert "replace_with_kernel_inject=False" in text
    assert "(original error: ValueError: This op had not been implemented on CPU backend.)" in text


def test_hint_for_inference_engine_in_pipeline():
    text = hints.explain(AttributeError("'InferenceEngine' object has no attribute 'device'"))
    assert "model=engine.module" in text
    assert "(original error: AttributeError: 'InferenceEngine' object has no attribute 'device')" in text


@pytest.mark.parametrize("exc, expected", [
    (RuntimeError("CUDA out of memory"), "RuntimeError: CUDA out of memory"),
    (KeyError("inputs"), "KeyError: 'inputs'"),
    (ValueError("bad"), "ValueError: bad"),
])
def test_unknown_error_is_type_and_message(exc, expected):
    assert hints.explain(exc) == expected


def test_attribute_error_on_none_gets_no_inference_engine_hint():
    exc = AttributeError("'NoneType' object has no attribute 'config'")
    assert hints.explain(exc) == "AttributeError: 'NoneType' object has no attribute 'config'"


# --- check_body -----------------------------------------------------------------------------------------

class Group:
    """Stand-in for a WorkerGroup: check_body reads only its config."""

    def __init__(self, config: ModelConfig):
        self.config = config


@pytest.fixture
def builtin(tmp_path) -> Group:
    return Group(ModelConfig(name="m", model_dir=tmp_path))


@pytest.fixture
def custom(tmp_path) -> Group:
    (tmp_path / "model.py").write_text("def handle(inputs):\n    pass\n")
    return Group(ModelConfig(name="m", model_dir=tmp_path))


def error_of(response) -> dict:
    assert response is not None
    body = json.loads(response.body)
    assert body["code"] == response.status
    return body


def test_check_body_non_json_empty_body_is_400(builtin):
    response = check_body(builtin, "text/plain", b"")
    assert response.status == 400
    assert error_of(response)["type"] == "BadRequest"


def test_check_body_non_json_with_body_passes(builtin):
    assert check_body(builtin, "text/plain", b"hello") is None
    assert check_body(builtin, "application/octet-stream", b"\x00\x01") is None


@pytest.mark.parametrize("body", [b"{", b"", b"{'inputs': 'x'}", b"not json"])
def test_check_body_malformed_json_is_400(builtin, body):
    response = check_body(builtin, "application/json", body)
    assert response.status == 400
    assert "not valid JSON" in error_of(response)["message"]


def test_check_body_malformed_json_is_400_for_custom_handler(custom):
    assert check_body(custom, "application/json", b"{").status == 400


@pytest.mark.parametrize("payload, field", [
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
    ({"inputs": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ({"inputs": "x", "parameters": {"max_tokens": 5}}, "parameters.max_tokens"),
    ({"inputs": "x", "parameter": {}}, "parameter"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": [1, 2]}, "inputs"),
])
def test_check_body_bad_lmi_body_is_422_naming_field(builtin, payload, field):
    response = check_body(builtin, "application/json", json.dumps(payload).encode())
    assert response.status == 422
    body = error_of(response)
    assert body["type"] == "ValidationError"
    assert body["message"].startswith(field + ":") or f"; {field}:" in body["message"]


def test_check_body_bad_stream_flag_names_stream(builtin):
    response = check_body(builtin, "application/json", b'{"inputs": "x", "stream": "yes"}')
    assert response.status == 422
    assert error_of(response)["message"].startswith("stream:")


def test_check_body_custom_handler_skips_lmi_schema(custom):
    assert check_body(custom, "application/json", b'{"prompt": "x", "parameters": {"max_new_tokens": 0}}') is None


@pytest.mark.parametrize("payload", [
    {"inputs": "hello"},
    {"inputs": ["a", "b"], "parameters": {"max_new_tokens": 5}},
    {"inputs": "x", "parameters": {"do_sample": True, "top_p": 0.9, "top_k": 5, "temperature": 0.7, "seed": 1,
                                   "stop_sequences": "\n", "details": True}, "stream": True},
])
def test_check_body_valid_lmi_body_passes(builtin, payload):
    assert check_body(builtin, "application/json", json.dumps(payload).encode()) is None


# --- output_response ------------------------------------------------------------------------------------

def test_output_response_bytes_body():
    response = output_response(Output().add(b"\x00raw").for_item(0, 1))
    assert response.status == 200
    assert response.body == b"\x00raw"
    assert response.content_type == "application/octet-stream"


def test_output_response_json_body():
    response = output_response(Output().add({"generated_text": "hi"}).for_item(0, 1))
    assert response.status == 200
    assert json.loads(response.body) == {"generated_text": "hi"}
    assert response.content_type == "application/json"


def test_output_response_code_and_headers_from_output():
    out = Output().set_code(201).add_property("X-Elapsed", "12").add_property("Content-Type", "text/plain").add("ok")
    response = output_response(out.for_item(0, 1))
    assert response.status == 201
    assert response.headers["X-Elapsed"] == "12"
    assert response.content_type == "text/plain"
    assert response.body == b"ok"


def test_output_response_first_content_is_the_body():
    response = output_response(Output().add(b"first").add(b"second").for_item(0, 1))
    assert response.body == b"first"


def test_output_response_after_wire_round_trip():
    (frame,) = FrameBuffer(FROM_RANK).feed(encode(Response(1, Output().add("héllo").for_item(0, 1))))
    response = output_response(frame.output)
    assert response.status == 200
    assert response.body == "héllo".encode()


def test_output_response_without_content_is_424():
    response = output_response(Output().for_item(0, 1))
    assert response.status == 424
    assert error_of(response)["type"] == "HandlerError"


def test_output_response_batch_item_without_content_is_424():
    out = Output().add("for item 0", batch_index=0)
    assert output_response(out.for_item(0, 2)).status == 200
    assert output_response(out.for_item(1, 2)).status == 424


def test_output_response_handler_error():
    response = output_response(Output().error("boom").for_item(0, 1))
    assert response.status == 424
    assert response.content_type == "application/json"
    assert json.loads(response.body)["error"] == "boom"


def test_output_response_keeps_charset():
    out = Output().add_property("Content-Type", "text/plain; charset=utf-8").add("héllo")
    response = output_response(out.for_item(0, 1))
    assert response.content_type == "text/plain"
    assert response.charset == "utf-8"
