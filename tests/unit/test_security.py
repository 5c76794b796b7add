"""Redaction of secrets in /models, and the warning for an exposed server without an API key."""
import logging

from serving.api.auth import check_exposure, is_open
from serving.api.management import redact


def test_credentials_are_redacted():
    values = {"hf_token": "hf_abc", "aws_secret_access_key": "s", "db_password": "p", "api_key": "k",
              "s3url": "s3://bucket/model", "model_id": "https://user:pw@host/model", "dtype": "fp16",
              "empty_token": ""}
    shown = redact(values)
    assert {shown[k] for k in ("hf_token", "aws_secret_access_key", "db_password", "api_key", "s3url")} == {"***"}
    assert shown["model_id"] == "https://***@host/model"
    assert shown["dtype"] == "fp16" and shown["empty_token"] == ""


def test_exposed_address_without_key_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="tpserve.auth"):
        check_exposure("127.0.0.1", None)
        check_exposure("0.0.0.0", "key")
        assert not caplog.records
        check_exposure("0.0.0.0", None)
    assert "without an API key" in caplog.text


def test_only_health_probes_are_open():
    assert is_open("/ping") and is_open("/health") and is_open("/health/live")
    assert not is_open("/pingx") and not is_open("/models") and not is_open("/healthz")
