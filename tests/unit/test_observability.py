"""Health endpoints and JSON logs without personal data."""

from __future__ import annotations

import logging

import httpx
import orjson

from nudgeflow.core.observability import Health, JsonFormatter, redact, serve_health


def test_health_is_alive_at_once_and_ready_only_once_running() -> None:
    health = Health()
    server = serve_health(health, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 503
        health.ready.set()
        assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200
        assert "python_info" in metrics.text
    finally:
        server.shutdown()
        server.server_close()


def test_log_lines_are_json_with_the_trigger_id_and_no_personal_data() -> None:
    record = logging.LogRecord(
        "nudgeflow.dispatch", logging.WARNING, __file__, 1,
        "dispatch failed for %s at %s", ("ann@example.com", "+49 170 1234567"), None,
    )
    record.trigger_id = "5f0c-id"
    line = orjson.loads(JsonFormatter().format(record))
    assert line["trigger_id"] == "5f0c-id"
    assert line["level"] == "warning"
    assert "example.com" not in line["message"]
    assert "1234567" not in line["message"]
    assert line["message"] == "dispatch failed for <email> at <phone>"


def test_redact_leaves_ids_and_times_alone() -> None:
    text = "trigger 5f0c1a2b user 12345 at 2026-03-01T10:15:00Z"
    assert redact(text) == text


def test_north_american_numbers_are_masked_too() -> None:
    assert redact("call (212) 555-0100 or 212-555-0100") == "call <phone> or <phone>"
