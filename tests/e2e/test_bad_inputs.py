"""The bad-input corpus (issue 9): each request once made tpserve answer 500, 424 or nothing useful. Every one
must get a 4xx JSON error that names the problem, from the front end, before any rank sees it."""
import json

import pytest

from tests.e2e.test_faults import RESULTS

NESTED = b"[" * 100_000 + b"]" * 100_000
LMI = {"Content-Type": "application/json"}
CORPUS = [
    # (name, path, body, headers, status, words the message must contain)
    ("deep nesting /predictions", "/predictions/smollm2", NESTED, LMI, 400, "nested"),
    ("deep nesting /invocations", "/invocations?model_name=smollm2", NESTED, LMI, 400, "nested"),
    ("deep nesting /v1", "/v1/completions", NESTED, LMI, 400, "nested"),
    ("deep nesting custom handler", "/predictions/faulty", NESTED, LMI, 400, "nested"),
    ("temperature Infinity", "/predictions/smollm2", b'{"inputs": "x", "parameters": {"temperature": Infinity}}', LMI, 422, "temperature"),
    ("temperature NaN /v1", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "temperature": NaN}', LMI, 422, "temperature"),
    ("max_tokens 1e9 /v1", "/v1/completions", json.dumps({"model": "smollm2", "prompt": "x", "max_tokens": 1e9}).encode(), LMI, 422, "max_tokens"),
    ("10,000 stop strings /v1", "/v1/completions", json.dumps({"model": "smollm2", "prompt": "x", "stop": ["a"] * 10_000}).encode(), LMI, 422, "stop"),
    ("10,000 stop strings LMI", "/predictions/smollm2", json.dumps({"inputs": "x", "parameters": {"stop_sequences": ["a"] * 10_000}}).encode(), LMI, 422, "stop_sequences"),
    ("empty inputs", "/predictions/smollm2", b'{"inputs": ""}', LMI, 422, "inputs"),
    ("empty prompt /v1", "/v1/completions", b'{"model": "smollm2", "prompt": ""}', LMI, 422, "prompt"),
    ("256 prompts", "/predictions/smollm2", json.dumps({"inputs": ["x"] * 256}).encode(), LMI, 422, "inputs"),
    ("256 prompts /v1", "/v1/completions", json.dumps({"model": "smollm2", "prompt": ["x"] * 256}).encode(), LMI, 422, "prompt"),
    ("n too large", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "n": 1000}', LMI, 422, "n"),
    ("max_new_tokens huge", "/predictions/smollm2", b'{"inputs": "x", "parameters": {"max_new_tokens": 100000000}}', LMI, 422, "max_new_tokens"),
    ("non-UTF-8 text", "/predictions/smollm2", b"\xff\xfe\xfa", {"Content-Type": "text/plain"}, 400, "UTF-8"),
    ("non-UTF-8 JSON", "/predictions/smollm2", b'{"inputs": "\xff"}', LMI, 400, "JSON"),
    ("non-UTF-8 JSON /v1", "/v1/completions", b'{"model": "\xff"}', LMI, 400, "JSON"),
    ("body over the limit", "/predictions/smollm2", b"x" * (5 * 2**20), {"Content-Type": "text/plain"}, 413, "at most"),
    ("empty body", "/predictions/smollm2", b"", {"Content-Type": "text/plain"}, 400, "empty"),
    ("not JSON", "/predictions/smollm2", b"{", LMI, 400, "JSON"),
    ("JSON not an object", "/v1/chat/completions", b"[1, 2]", LMI, 422, ""),
    ("no messages", "/v1/chat/completions", b'{"model": "smollm2", "messages": []}', LMI, 422, "messages"),
    ("bad role", "/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "root", "content": "x"}]}', LMI, 422, "role"),
    ("unknown parameter", "/predictions/smollm2", b'{"inputs": "x", "parameters": {"max_tokens": 5}}', LMI, 422, "max_tokens"),
    ("unknown model", "/predictions/nope", b"x", {"Content-Type": "text/plain"}, 404, "nope"),
    ("unknown model /v1", "/v1/completions", b'{"model": "nope", "prompt": "x"}', LMI, 404, "nope"),
    ("seed out of range", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "seed": -1}', LMI, 422, "seed"),
]
PASSED: list[str] = []


@pytest.mark.parametrize("name,path,body,headers,status,words", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_gets_a_4xx_json_error(server, name, path, body, headers, status, words):
    response = server.post(path, data=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text[:300]
    payload = response.json()
    message = payload["message"] if "message" in payload else payload["error"]["message"]
    assert words.lower() in message.lower(), message
    PASSED.append(name)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**old, "bad_input_corpus": len(CORPUS), "bad_input_passed": len(PASSED)}, indent=2))

