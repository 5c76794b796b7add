"""Management rules without a server: what a registration url may name, who may change what is served,
default versions, GPU hand-out per worker group, and the JSON log line."""
import asyncio
import io
import json
import logging
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from serving.api.auth import API_KEY
from serving.api.management import BadRequest, change_refused, resolve_in_store
from serving.config import load_model_config
from serving.logs import REQUEST_ID, JsonFormatter, RequestIdFilter
from serving.registry import Devices, ModelRegistry, NoDevices


@pytest.fixture()
def store(tmp_path):
    root = tmp_path / "store"
    (root / "good").mkdir(parents=True)
    (root / "nested" / "deep").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    return root


@pytest.mark.parametrize("url,expected", [("good", "good"), ("nested/deep", "nested/deep"),
                                          ("file:///STORE/good", "good"), ("/STORE/nested/deep", "nested/deep")])
def test_urls_inside_the_store(store, url, expected):
    assert resolve_in_store(store, url.replace("/STORE", str(store))) == (store / expected).resolve()


@pytest.mark.parametrize("url", ["", "..", "good/../../outside", "/etc", "file:///etc", "file://host/STORE/good",
                                 "http://example.com/m", "s3://bucket/m", "link", "missing", "/STORE", "."])
def test_urls_outside_the_store_or_elsewhere_are_refused(store, url):
    with pytest.raises(BadRequest):
        resolve_in_store(store, url.replace("/STORE", str(store)))


def request_from(address: str, headers: dict | None = None, api_key: str | None = None):
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (address, 40000) if name == "peername" else default
    app = web.Application()
    if api_key:
        app[API_KEY] = api_key
    return make_mocked_request("POST", "/models", headers=headers or {}, transport=transport, app=app)


def test_changes_from_loopback_only_unless_the_server_has_an_api_key():
    assert change_refused(request_from("127.0.0.1")) is None
    assert change_refused(request_from("::1")) is None
    assert change_refused(request_from("10.1.2.3")).status == 403
    # with a key, the auth middleware (serving/api/auth.py) has checked the caller's token already
    assert change_refused(request_from("10.1.2.3", api_key="s3cret")) is None


def model(tmp_path, name, version=None, engine="Python"):
    folder = tmp_path / f"{name}-{version}"
    folder.mkdir(parents=True)
    (folder / "serving.properties").write_text(f"engine={engine}\n" + (f"model_version={version}\n" if version else ""))
    return load_model_config(folder, name=name)


def test_default_version_moves_when_it_is_unregistered(tmp_path):
    registry = ModelRegistry([model(tmp_path, "m", "a")])
    registry.add(model(tmp_path, "m", "b"))
    assert registry.get("m").version == "a"
    assert [v.version for v in registry.versions_of("m")] == ["a", "b"]
    asyncio.run(registry.remove("m", "a"))  # no groups were started: nothing to drain
    assert registry.get("m").version == "b"
    asyncio.run(registry.remove("m"))
    assert "m" not in registry.models


def test_same_name_and_version_twice_is_refused_at_startup(tmp_path):
    with pytest.raises(ValueError, match="share the name"):
        ModelRegistry([model(tmp_path / "x", "m", "1"), model(tmp_path / "y", "m", "1")])


def test_gpus_are_handed_out_per_group():
    devices = Devices(["0", "1", "2", "3"])
    assert devices.take(2, strict=True) == ["0", "1"]
    assert devices.take(2, strict=True) == ["2", "3"]
    with pytest.raises(NoDevices):
        devices.take(2, strict=True)
    assert devices.take(2, strict=False) is None  # startup models share, as before
    devices.give_back(["0", "1"])
    assert devices.take(1, strict=True) == ["0"]
    assert Devices([]).take(8, strict=True) is None  # a CPU machine: no hand-out


def test_json_log_lines_carry_the_request_id_and_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.jsonlog")
    logger.addHandler(handler)
    token = REQUEST_ID.set("abc-1")
    try:
        logger.warning("hello %s", "world", extra={"fields": {"status": 200}})
    finally:
        REQUEST_ID.reset(token)
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "hello world" and entry["request_id"] == "abc-1" and entry["status"] == 200
