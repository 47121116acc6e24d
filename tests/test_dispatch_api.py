"""The reference dispatch API on a real loopback server, called with a real httpx client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from nudgeflow.dispatch_api import ServerThread, create_app
from nudgeflow.settings import DispatchSettings
from nudgeflow.timeutil import datetime_to_ms
from nudgeflow.triggers import Decision, Trigger, make_trigger_id
from sinks.dispatch import Dispatcher, DispatchResult

NOW = datetime(2026, 3, 1, 10, 15, tzinfo=UTC)
NOW_MS = datetime_to_ms(NOW)


def fixed_now() -> datetime:
    return NOW


def make_decision(n: int = 0, *, send_at_ms: int = NOW_MS) -> Decision:
    user_id = f"u{n}"
    fired_at_ms = NOW_MS - 60_000 + n
    trigger = Trigger(
        trigger_id=make_trigger_id("cart_abandonment", user_id, fired_at_ms),
        trigger_type="cart_abandonment",
        user_id=user_id,
        fired_at_ms=fired_at_ms,
        detected_at_ms=fired_at_ms + 12,
        segment="vip",
        metadata={"cart_value": 150.0, "items": [{"product_id": "p1", "quantity": 1}]},
    )
    return Decision(trigger, "dispatched", None, channel="email", send_at_ms=send_at_ms)


def post(client: httpx.Client, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key if key is not None else body["trigger_id"]}
    return client.post("/api/trigger", json=body, headers=headers)


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    error: str = body["error"]
    return error


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "sent.jsonl"


@pytest.fixture
def server(log_path: Path) -> Iterator[ServerThread]:
    with ServerThread(create_app(log_path, clock=fixed_now)) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        yield http


def test_server_thread_listens_on_a_free_loopback_port(server: ServerThread) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert not server.url.endswith(":0")


def test_accepts_a_trigger(client: httpx.Client, log_path: Path) -> None:
    body = make_decision().dispatch_body()

    response = post(client, body)

    assert response.status_code == 202
    assert response.json() == {"trigger_id": body["trigger_id"], "status": "accepted"}
    [line] = log_lines(log_path)
    assert line["trigger_id"] == body["trigger_id"]
    assert line["channel"] == "email"
    assert line["metadata"] == body["metadata"]
    assert line["received_at"] == "2026-03-01T10:15:00Z"


def test_repeat_answers_the_same_and_sends_nothing_new(
    client: httpx.Client, log_path: Path
) -> None:
    body = make_decision().dispatch_body()
    first = post(client, body)
    # A replay carries a new detected_at and is still the same trigger.
    replay = post(client, {**body, "detected_at": "2026-03-01T11:00:00Z"})

    assert replay.status_code == 202
    assert replay.json() == first.json()
    assert len(log_lines(log_path)) == 1


def test_status_in_both_forms(client: httpx.Client) -> None:
    body = make_decision().dispatch_body()
    post(client, body)
    expected = {"trigger_id": body["trigger_id"], "status": "accepted"}

    by_query = client.get("/api/trigger/status", params={"trigger_id": body["trigger_id"]})
    by_path = client.get(f"/api/trigger/status/{body['trigger_id']}")

    assert (by_query.status_code, by_query.json()) == (200, expected)
    assert (by_path.status_code, by_path.json()) == (200, expected)


def test_unknown_trigger_is_404(client: httpx.Client) -> None:
    assert assert_error(client.get("/api/trigger/status/nope"), 404) == "unknown trigger_id"
    by_query = client.get("/api/trigger/status", params={"trigger_id": "nope"})
    assert assert_error(by_query, 404) == "unknown trigger_id"


def test_unknown_route_and_method_have_the_error_shape(client: httpx.Client) -> None:
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.get("/api/trigger"), 405)


def test_missing_idempotency_key_is_400(client: httpx.Client, log_path: Path) -> None:
    response = client.post("/api/trigger", json=make_decision().dispatch_body())

    assert assert_error(response, 400) == "missing Idempotency-Key header"
    assert log_lines(log_path) == []


def test_idempotency_key_must_match_trigger_id(client: httpx.Client) -> None:
    response = post(client, make_decision().dispatch_body(), key="another-id")

    assert "does not match" in assert_error(response, 400)


def test_bad_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/api/trigger",
        content=b'{"trigger_id": ',
        headers={"Idempotency-Key": "x", "Content-Type": "application/json"},
    )

    assert assert_error(response, 400) == "request body is not valid JSON"


def test_unknown_channel_is_400(client: httpx.Client, log_path: Path) -> None:
    body = {**make_decision().dispatch_body(), "channel": "pigeon"}

    response = post(client, body)

    assert assert_error(response, 400).startswith("channel:")
    assert log_lines(log_path) == []


def test_missing_status_query_is_400(client: httpx.Client) -> None:
    response = client.get("/api/trigger/status")

    assert assert_error(response, 400) == "missing query parameter trigger_id"


def test_future_send_at_is_scheduled(client: httpx.Client) -> None:
    later = make_decision(1, send_at_ms=NOW_MS + 600_000).dispatch_body()

    response = post(client, later)

    assert response.json() == {"trigger_id": later["trigger_id"], "status": "scheduled"}
    status = client.get(f"/api/trigger/status/{later['trigger_id']}")
    assert status.json()["status"] == "scheduled"


class NoSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def send(settings: DispatchSettings, decisions: list[Decision]) -> list[DispatchResult]:
    failures: list[tuple[Decision, DispatchResult]] = []

    async def go() -> list[DispatchResult]:
        async with Dispatcher(
            settings, on_failure=lambda d, r: failures.append((d, r)), sleep=NoSleep()
        ) as dispatcher:
            return await dispatcher.send_all(decisions)

    results = asyncio.run(go())
    assert failures == [(d, r) for d, r in zip(decisions, results, strict=True) if not r.ok]
    return results


def test_dispatcher_retries_through_injected_failures(log_path: Path) -> None:
    decision = make_decision()
    with ServerThread(create_app(log_path, fail_first=2)) as server:
        settings = DispatchSettings(url=server.url, timeout_s=5.0)

        [result] = send(settings, [decision])

        assert (result.ok, result.status, result.attempts) == (True, 202, 3)
        with httpx.Client(base_url=server.url) as client:
            status = client.get(f"/api/trigger/status/{decision.trigger.trigger_id}")
        assert status.json()["status"] == "accepted"
    [line] = log_lines(log_path)
    assert line["trigger_id"] == decision.trigger.trigger_id


def test_dispatcher_sends_a_batch_once_each(log_path: Path) -> None:
    decisions = [make_decision(n) for n in range(40)]
    with ServerThread(create_app(log_path)) as server:
        settings = DispatchSettings(url=server.url, timeout_s=5.0, max_in_flight=8)

        first = send(settings, decisions)
        again = send(settings, decisions)  # a replay: idempotent

    assert all(result.ok for result in first + again)
    logged = [line["trigger_id"] for line in log_lines(log_path)]
    assert sorted(logged) == sorted(d.trigger.trigger_id for d in decisions)


def test_bearer_token_is_required_when_configured(log_path: Path) -> None:
    decision = make_decision()
    with ServerThread(create_app(log_path, token="s3cret")) as server:
        with httpx.Client(base_url=server.url) as client:
            assert_error(post(client, decision.dispatch_body()), 401)
        settings = DispatchSettings(url=server.url, timeout_s=5.0, token=SecretStr("s3cret"))

        [result] = send(settings, [decision])

    assert result.ok
    assert len(log_lines(log_path)) == 1
