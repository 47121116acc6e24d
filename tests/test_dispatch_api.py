"""The reference dispatch API on a real loopback server, called with a real httpx client."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from fastapi import FastAPI
from pydantic import SecretStr

from nudgeflow.core.errors import ConfigError, ServiceError
from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from nudgeflow.core.timeutil import datetime_to_ms
from nudgeflow.core.triggers import Channel, Decision, Trigger, make_trigger_id
from nudgeflow.dispatch_api.channels import Contact, DeliveryError, Message
from nudgeflow.dispatch_api.server import ServerThread, build_app, create_app
from nudgeflow.dispatch_api.trigger_store import (
    InMemoryTriggerStore,
    RedisTriggerStore,
    Status,
    StoredTrigger,
    TriggerStore,
)
from nudgeflow.sinks.dispatch import Dispatcher, DispatchResult

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
def app(log_path: Path) -> FastAPI:
    # No scheduler thread: statuses stay as they are until a test delivers.
    return create_app(log_path, clock=fixed_now, run_scheduler=False)


@pytest.fixture
def server(app: FastAPI) -> Iterator[ServerThread]:
    with ServerThread(app) as running:
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


def test_status_in_both_forms(client: httpx.Client) -> None:  # before delivery
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


def test_idempotency_key_must_match_trigger_id(client: httpx.Client, log_path: Path) -> None:
    body = make_decision().dispatch_body()

    response = post(client, body, key="another-id")

    assert assert_error(response, 409) == "Idempotency-Key does not match trigger_id"
    assert log_lines(log_path) == []
    # refused, not stored under either id
    assert client.get(f"/api/trigger/status/{body['trigger_id']}").status_code == 404
    assert client.get("/api/trigger/status/another-id").status_code == 404


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
            wait_for(lambda: status_of(client, decision.trigger.trigger_id) == "sent")
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


# -- delivery, scheduling, cancelling ----------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            msg = "condition not met in time"
            raise AssertionError(msg)
        time.sleep(0.01)


def status_of(client: httpx.Client, trigger_id: str) -> str:
    response = client.get(f"/api/trigger/status/{trigger_id}")
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


class MutableClock:
    """`now` for the API, moved by the test."""

    def __init__(self, now: datetime = NOW) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


class RecordingAdapter:
    """A channel adapter that keeps what it is asked to send (or fails, when told to)."""

    def __init__(self, channel: Channel = "email", error: str | None = None) -> None:
        self._channel: Channel = channel
        self.error = error
        self.sent: list[tuple[Message, Contact, str]] = []
        self._lock = threading.Lock()

    @property
    def channel(self) -> Channel:
        return self._channel

    def send(self, message: Message, contact: Contact, *, trigger_id: str) -> None:
        with self._lock:
            self.sent.append((message, contact, trigger_id))
        if self.error is not None:
            raise DeliveryError(self._channel, self.error)

    def ids(self) -> list[str]:
        with self._lock:
            return [trigger_id for _, _, trigger_id in self.sent]


def test_accepted_becomes_sent_once_delivered(
    app: FastAPI, client: httpx.Client, log_path: Path
) -> None:
    body = make_decision().dispatch_body()
    post(client, body)
    assert status_of(client, body["trigger_id"]) == "accepted"

    assert app.state.scheduler.run_once() == 1

    assert status_of(client, body["trigger_id"]) == "sent"
    # a repeat still answers the first answer, and nothing is delivered again
    assert post(client, body).json()["status"] == "accepted"
    assert app.state.scheduler.run_once() == 0
    assert len(log_lines(log_path)) == 1


def test_scheduled_is_sent_when_due_and_not_before() -> None:
    clock = MutableClock()
    email = RecordingAdapter()
    app = create_app(clock=clock, adapters={"email": email}, run_scheduler=False)
    later = make_decision(send_at_ms=NOW_MS + 600_000).dispatch_body()
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        assert post(client, later).json()["status"] == "scheduled"

        clock.advance(timedelta(minutes=9, seconds=59))
        assert app.state.scheduler.run_once() == 0
        assert status_of(client, later["trigger_id"]) == "scheduled"

        clock.advance(timedelta(seconds=1))
        assert app.state.scheduler.run_once() == 1
        assert status_of(client, later["trigger_id"]) == "sent"

    assert email.ids() == [later["trigger_id"]]


def test_scheduler_thread_sends_due_triggers_by_itself() -> None:
    clock = MutableClock()
    email = RecordingAdapter()
    app = create_app(clock=clock, adapters={"email": email}, scheduler_interval_s=0.01)
    now_body = make_decision(0).dispatch_body()
    later_body = make_decision(1, send_at_ms=NOW_MS + 3_600_000).dispatch_body()
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        post(client, now_body)
        post(client, later_body)
        wait_for(lambda: status_of(client, now_body["trigger_id"]) == "sent")
        assert status_of(client, later_body["trigger_id"]) == "scheduled"

        clock.advance(timedelta(hours=1))

        wait_for(lambda: status_of(client, later_body["trigger_id"]) == "sent")
    assert sorted(email.ids()) == sorted([now_body["trigger_id"], later_body["trigger_id"]])


def test_cancel_a_scheduled_trigger() -> None:
    clock = MutableClock()
    email = RecordingAdapter()
    app = create_app(clock=clock, adapters={"email": email}, run_scheduler=False)
    first = make_decision(0, send_at_ms=NOW_MS + 600_000).dispatch_body()
    second = make_decision(1, send_at_ms=NOW_MS + 600_000).dispatch_body()
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        post(client, first)
        post(client, second)

        by_post = client.post(f"/api/trigger/{first['trigger_id']}/cancel")
        by_delete = client.delete(f"/api/trigger/{second['trigger_id']}")
        again = client.post(f"/api/trigger/{first['trigger_id']}/cancel")

        for response, body in ((by_post, first), (by_delete, second), (again, first)):
            assert response.status_code == 200, response.text
            assert response.json() == {"trigger_id": body["trigger_id"], "status": "cancelled"}
        assert status_of(client, first["trigger_id"]) == "cancelled"
        clock.advance(timedelta(hours=1))
        assert app.state.scheduler.run_once() == 0
        assert status_of(client, second["trigger_id"]) == "cancelled"
    assert email.sent == []


def test_cancel_after_sending_is_409_and_unknown_is_404(
    app: FastAPI, client: httpx.Client
) -> None:
    body = make_decision().dispatch_body()
    post(client, body)
    app.state.scheduler.run_once()

    late = client.post(f"/api/trigger/{body['trigger_id']}/cancel")

    assert assert_error(late, 409) == "trigger is sent; only a scheduled trigger can be cancelled"
    assert status_of(client, body["trigger_id"]) == "sent"
    assert assert_error(client.delete("/api/trigger/nope"), 404) == "unknown trigger_id"


def test_delivery_failure_is_status_failed_with_the_reason() -> None:
    push = RecordingAdapter("push", error="no push token for user u0")
    app = create_app(adapters={"push": push}, run_scheduler=False)
    body = {**make_decision().dispatch_body(), "channel": "push"}
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        post(client, body)
        app.state.scheduler.run_once()

        assert status_of(client, body["trigger_id"]) == "failed"
    record = app.state.store.get(body["trigger_id"])
    assert record.error == "push: no push token for user u0"


def test_message_and_contact_reach_the_adapter_and_contact_stays_out_of_the_log(
    log_path: Path,
) -> None:
    email = RecordingAdapter()
    app = create_app(log_path, adapters={"email": email}, run_scheduler=False)
    body = {
        **make_decision().dispatch_body(),
        "message": {"subject": "Hi Ada", "body": "Your cart is waiting."},
        "contact": {"email": "ada@example.com", "name": "Ada"},
    }
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        post(client, body)
        app.state.scheduler.run_once()

    [(message, contact, _)] = email.sent
    assert message == Message("Hi Ada", "Your cart is waiting.")
    assert (contact.email, contact.name) == ("ada@example.com", "Ada")
    [line] = log_lines(log_path)
    assert line["message"] == {"subject": "Hi Ada", "body": "Your cart is waiting."}
    assert "contact" not in line


# -- authentication ----------------------------------------------------------------------------


def test_token_is_checked_before_the_request_is_validated() -> None:
    app = create_app(token="s3cret", run_scheduler=False)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        bad_body = client.post("/api/trigger", content=b"{", headers={"Idempotency-Key": "x"})
        status = client.get("/api/trigger/status/x")
        cancel = client.post("/api/trigger/x/cancel", headers={"Authorization": "Bearer wrong"})

    for response in (bad_body, status, cancel):
        assert assert_error(response, 401) == "missing or wrong bearer token"
    assert bad_body.headers["WWW-Authenticate"] == "Bearer"


def signed_headers(secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    stamp = str(timestamp)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret.encode(), stamp, body),
    }


def test_hmac_signature_is_required_and_checked(log_path: Path) -> None:
    secret = "hmac-s3cret"
    app = create_app(log_path, clock=fixed_now, hmac_secret=secret, run_scheduler=False)
    body = make_decision().dispatch_body()
    content = orjson.dumps(body)
    now_s = int(NOW.timestamp())
    key = {"Idempotency-Key": body["trigger_id"]}
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        unsigned = client.post("/api/trigger", content=content,
                               headers={**key, "Content-Type": "application/json"})
        tampered = client.post(
            "/api/trigger", content=content.replace(b'"email"', b'"sms"'),
            headers={**key, **signed_headers(secret, content, now_s)},
        )
        stale = client.post("/api/trigger", content=content,
                            headers={**key, **signed_headers(secret, content, now_s - 301)})
        wrong_secret = client.post("/api/trigger", content=content,
                                   headers={**key, **signed_headers("other", content, now_s)})
        good = client.post("/api/trigger", content=content,
                           headers={**key, **signed_headers(secret, content, now_s)})

    assert assert_error(unsigned, 401) == "missing X-Nudgeflow-Signature header"
    assert assert_error(tampered, 401) == "X-Nudgeflow-Signature does not match the body"
    assert "more than 300 s" in assert_error(stale, 401)
    assert assert_error(wrong_secret, 401) == "X-Nudgeflow-Signature does not match the body"
    assert good.status_code == 202, good.text
    assert [line["trigger_id"] for line in log_lines(log_path)] == [body["trigger_id"]]


def test_dispatcher_signs_with_hmac_and_never_logs_the_secret(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hmac-s3cret-never-logged"
    decisions = [make_decision(n) for n in range(3)]
    app = create_app(log_path, hmac_secret=secret, fail_first=2, token="tok-never-logged")
    with caplog.at_level(logging.DEBUG), ServerThread(app) as server:
        settings = DispatchSettings(
            url=server.url, timeout_s=5.0, hmac_secret=SecretStr(secret),
            token=SecretStr("tok-never-logged"),
        )
        results = send(settings, decisions)
        # and a dispatcher with the wrong secret is refused, not retried
        wrong = send(settings.model_copy(update={"hmac_secret": SecretStr("nope")}),
                     [make_decision(9)])

    assert all(result.ok for result in results)
    assert (wrong[0].ok, wrong[0].status, wrong[0].attempts) == (False, 401, 1)
    assert len(log_lines(log_path)) == 3
    assert secret not in caplog.text
    assert "tok-never-logged" not in caplog.text


# -- the batch endpoint and the fast path ------------------------------------------------------


def post_batch(client: httpx.Client, bodies: list[dict[str, Any]]) -> httpx.Response:
    return client.post("/api/triggers", json=bodies)


def test_batch_answers_each_trigger_in_order_and_logs_each_once(
    client: httpx.Client, log_path: Path
) -> None:
    earlier = make_decision(0).dispatch_body()
    assert post(client, earlier).status_code == 202
    now_body = make_decision(1).dispatch_body()
    later = make_decision(2, send_at_ms=NOW_MS + 600_000).dispatch_body()
    # a repeat of an earlier request, and of an earlier item of the same batch
    bodies = [now_body, earlier, later, {**now_body, "detected_at": "2026-03-01T11:00:00Z"}]

    response = post_batch(client, bodies)

    assert response.status_code == 202, response.text
    assert response.json() == {
        "results": [
            {"trigger_id": now_body["trigger_id"], "status": "accepted"},
            {"trigger_id": earlier["trigger_id"], "status": "accepted"},
            {"trigger_id": later["trigger_id"], "status": "scheduled"},
            {"trigger_id": now_body["trigger_id"], "status": "accepted"},
        ]
    }
    logged = [line["trigger_id"] for line in log_lines(log_path)]
    assert logged == [earlier["trigger_id"], now_body["trigger_id"], later["trigger_id"]]
    assert status_of(client, later["trigger_id"]) == "scheduled"
    # and a single request with the key of a batch item is a repeat too
    assert post(client, later).json() == {"trigger_id": later["trigger_id"], "status": "scheduled"}
    assert len(log_lines(log_path)) == 3


def test_batch_with_one_bad_item_is_refused_whole(client: httpx.Client, log_path: Path) -> None:
    good = make_decision(0).dispatch_body()
    bad = {**make_decision(1).dispatch_body(), "channel": "pigeon"}

    response = post_batch(client, [good, bad])

    assert assert_error(response, 400).startswith("1.channel:")
    assert log_lines(log_path) == []
    assert client.get(f"/api/trigger/status/{good['trigger_id']}").status_code == 404


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[]", "List should have at least 1 item"),
        (b'{"trigger_id": "x"}', "Input should be a valid list"),
        (b"[", "request body is not valid JSON"),
    ],
)
def test_batch_must_be_a_non_empty_json_array(
    client: httpx.Client, content: bytes, reason: str
) -> None:
    response = client.post(
        "/api/triggers", content=content, headers={"Content-Type": "application/json"}
    )

    assert reason in assert_error(response, 400)


def test_batch_of_more_than_1000_is_refused(client: httpx.Client, log_path: Path) -> None:
    body = make_decision().dispatch_body()

    response = post_batch(client, [body] * 1001)

    assert "at most 1000 items" in assert_error(response, 400)
    assert log_lines(log_path) == []


def test_batch_needs_the_same_credentials(log_path: Path) -> None:
    body = make_decision().dispatch_body()
    app = create_app(log_path, token="s3cret", run_scheduler=False)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        refused = post_batch(client, [body])
        accepted = client.post(
            "/api/triggers", json=[body], headers={"Authorization": "Bearer s3cret"}
        )

    assert assert_error(refused, 401) == "missing or wrong bearer token"
    assert accepted.status_code == 202, accepted.text
    assert len(log_lines(log_path)) == 1


def test_injected_failures_count_batches_too(log_path: Path) -> None:
    body = make_decision().dispatch_body()
    app = create_app(log_path, fail_first=1, run_scheduler=False)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        first = post_batch(client, [body])
        second = post_batch(client, [body])

    assert assert_error(first, 500) == "injected failure (fail_first)"
    assert second.status_code == 202
    assert len(log_lines(log_path)) == 1


def test_each_accepted_trigger_is_in_the_log_before_its_answer(
    client: httpx.Client, log_path: Path
) -> None:
    for n in range(20):
        body = make_decision(n).dispatch_body()
        assert post(client, body).status_code == 202
        assert log_lines(log_path)[-1]["trigger_id"] == body["trigger_id"]


def test_concurrent_requests_are_each_stored_and_logged_once(
    server: ServerThread, log_path: Path
) -> None:
    bodies = [make_decision(n).dispatch_body() for n in range(60)]

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
            # every body twice, at once: one of each pair is the repeat
            return await asyncio.gather(*(
                http.post("/api/trigger", json=b, headers={"Idempotency-Key": b["trigger_id"]})
                for b in bodies + bodies
            ))  # fmt: skip

    responses = asyncio.run(go())

    assert {r.status_code for r in responses} == {202}
    assert {r.json()["status"] for r in responses} == {"accepted"}
    logged = [line["trigger_id"] for line in log_lines(log_path)]
    assert sorted(logged) == sorted(b["trigger_id"] for b in bodies)


def test_fastapi_and_the_fast_path_accept_alike(client: httpx.Client, log_path: Path) -> None:
    # FastAPI reads a +json type as JSON too; the fast path leaves such a request to FastAPI.
    body = make_decision().dispatch_body()
    other = {**body, "trigger_id": "other-id"}
    answers = []
    for each, content_type in ((body, "application/vnd.nudgeflow+json"),
                               (other, "application/json")):
        headers = {"Idempotency-Key": each["trigger_id"], "Content-Type": content_type}
        response = client.post("/api/trigger", content=orjson.dumps(each), headers=headers)
        assert response.status_code == 202
        assert response.headers["content-type"] == "application/json"
        answers.append(response.json())

    assert answers == [{"trigger_id": body["trigger_id"], "status": "accepted"},
                       {"trigger_id": "other-id", "status": "accepted"}]
    by_fastapi, by_fast_path = log_lines(log_path)
    assert by_fast_path == {**by_fastapi, "trigger_id": "other-id"}


def test_a_failing_log_forgets_the_trigger_so_that_the_retry_sends_it(tmp_path: Path) -> None:
    log_dir = tmp_path / "not-yet"  # the log cannot be opened until this exists
    app = create_app(log_dir / "sent.jsonl", clock=fixed_now, run_scheduler=False)
    body = make_decision().dispatch_body()
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        failed = post(client, body)
        assert client.get(f"/api/trigger/status/{body['trigger_id']}").status_code == 404
        log_dir.mkdir()
        retried = post(client, body)

    assert assert_error(failed, 500) == "internal server error"
    assert retried.status_code == 202
    assert [line["trigger_id"] for line in log_lines(log_dir / "sent.jsonl")] == [
        body["trigger_id"]
    ]


# -- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_declares_every_operation_and_its_errors(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()

    paths = document["paths"]
    operations = {
        (method.upper(), path): operation
        for path, methods in paths.items()
        for method, operation in methods.items()
    }
    assert set(operations) == {
        ("POST", "/api/trigger"),
        ("POST", "/api/triggers"),
        ("GET", "/api/trigger/status"),
        ("GET", "/api/trigger/status/{trigger_id}"),
        ("POST", "/api/trigger/{trigger_id}/cancel"),
        ("DELETE", "/api/trigger/{trigger_id}"),
        ("POST", "/api/trigger/{trigger_id}/events"),
        ("GET", "/api/trigger/{trigger_id}/events"),
    }
    error_ref = "#/components/schemas/ErrorBody"
    expected_errors = {
        ("POST", "/api/trigger"): {"400", "401", "409", "500"},
        ("POST", "/api/triggers"): {"400", "401", "500"},
        ("GET", "/api/trigger/status"): {"400", "401", "404", "500"},
        ("GET", "/api/trigger/status/{trigger_id}"): {"401", "404", "500"},
        ("POST", "/api/trigger/{trigger_id}/cancel"): {"401", "404", "409", "500"},
        ("DELETE", "/api/trigger/{trigger_id}"): {"401", "404", "409", "500"},
        ("POST", "/api/trigger/{trigger_id}/events"): {"400", "401", "404", "409", "500"},
        ("GET", "/api/trigger/{trigger_id}/events"): {"401", "404", "500"},
    }
    for key, operation in operations.items():
        responses = operation["responses"]
        assert "422" not in responses
        errors = {code for code in responses if code.startswith(("4", "5"))}
        assert errors == expected_errors[key], key
        for code in errors:
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": error_ref}
    assert operations["POST", "/api/trigger"]["responses"].keys() >= {"202"}
    assert operations["POST", "/api/triggers"]["responses"].keys() >= {"202"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
    channel = document["components"]["schemas"]["TriggerRequest"]["properties"]["channel"]
    assert channel["enum"] == ["email", "sms", "push"]


def test_openapi_declares_the_bearer_scheme_when_a_token_is_set() -> None:
    with ServerThread(create_app(token="t", run_scheduler=False)) as server:
        document = httpx.get(f"{server.url}/openapi.json").json()

    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert document["paths"]["/api/trigger"]["post"]["security"] == [{"HTTPBearer": []}]


def test_build_app_refuses_a_bad_smtp_address() -> None:
    with pytest.raises(ConfigError, match="bad --smtp 'nohost'"):
        build_app(None, smtp="nohost")


# -- stores: the same contract in memory and in Redis ------------------------------------------


def record(
    trigger_id: str, *, due_ms: int | None = NOW_MS, status: Any = "accepted"
) -> StoredTrigger:
    return StoredTrigger(trigger_id, status, NOW, due_ms, {"trigger_id": trigger_id, "n": 2**70})


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> Iterator[TriggerStore]:
    if request.param == "memory":
        yield InMemoryTriggerStore()
        return
    client: redis.Redis = request.getfixturevalue("redis_client")
    yield RedisTriggerStore(client, prefix="test:dispatch")


def test_store_put_if_absent_is_idempotent(store: TriggerStore) -> None:
    first, created = store.put_if_absent(record("a", status="scheduled"))
    again, created_again = store.put_if_absent(record("a", status="accepted"))

    assert (created, created_again) == (True, False)
    assert again == first
    assert (again.status, again.answer) == ("scheduled", "scheduled")
    assert again.payload == {"trigger_id": "a", "n": 2**70}  # big ints survive
    assert again.received_at == NOW
    assert store.get("missing") is None


def test_store_transition_is_compare_and_set(store: TriggerStore) -> None:
    store.put_if_absent(record("a", status="scheduled"))

    scheduled: tuple[Status, ...] = ("scheduled",)
    cancelled, changed = store.transition("a", scheduled, "cancelled")
    late, changed_late = store.transition("a", ("scheduled", "accepted"), "accepted")
    unknown, changed_unknown = store.transition("b", scheduled, "cancelled")

    assert changed and cancelled is not None and cancelled.status == "cancelled"
    assert not changed_late and late is not None and late.status == "cancelled"
    assert cancelled.answer == "scheduled"  # the first answer never changes
    assert (unknown, changed_unknown) == (None, False)
    failed, _ = store.transition("a", ["cancelled"], "failed", error="boom")
    assert failed is not None and failed.error == "boom"


def test_store_claims_due_triggers_with_a_lease(store: TriggerStore) -> None:
    store.put_if_absent(record("early", due_ms=NOW_MS - 10))
    store.put_if_absent(record("now", due_ms=NOW_MS))
    store.put_if_absent(record("later", due_ms=NOW_MS + 1000))
    store.put_if_absent(record("never", due_ms=None))

    assert store.claim_due(NOW_MS, limit=10, lease_ms=5000) == ["early", "now"]
    assert store.claim_due(NOW_MS, limit=10, lease_ms=5000) == []  # leased
    assert store.next_due_ms() == NOW_MS + 1000
    store.finish("early")
    # the lease of "now" ran out without a finish: claimed again (its deliverer died)
    assert store.claim_due(NOW_MS + 5000, limit=10, lease_ms=5000) == ["later", "now"]
    store.discard("now")
    store.finish("later")
    assert store.next_due_ms() is None
    assert store.get("now") is None


def test_store_put_many_and_the_async_methods(store: TriggerStore) -> None:
    async def go() -> None:
        results = await store.put_many(
            [record("a", status="scheduled"), record("b"), record("a", status="accepted")]
        )
        assert [(r.trigger_id, r.answer, created) for r, created in results] == [
            ("a", "scheduled", True), ("b", "accepted", True), ("a", "scheduled", False),
        ]  # fmt: skip
        [(again, created)] = await store.put_many([record("b", status="scheduled")])
        assert (again.answer, created) == ("accepted", False)
        assert again.payload == {"trigger_id": "b", "n": 2**70}
        got = await store.aget("a")
        assert got is not None and got.status == "scheduled"
        assert await store.aget("missing") is None
        cancelled, changed = await store.atransition("a", ["scheduled"], "cancelled")
        assert changed and cancelled is not None and cancelled.status == "cancelled"
        _, changed_again = await store.atransition("a", ["scheduled"], "cancelled")
        assert not changed_again
        await store.afinish("a")
        await store.adiscard_many(["b"])
        assert await store.aget("b") is None
        await store.aclose()

    asyncio.run(go())
    assert store.claim_due(NOW_MS, limit=10, lease_ms=5000) == []  # a finished, b discarded
    assert store.get("a") is not None


def test_store_starts_and_finishes_deliveries_in_batches(store: TriggerStore) -> None:
    store.put_if_absent(record("due", status="scheduled"))
    store.put_if_absent(record("sent", status="accepted"))
    store.put_if_absent(record("gone", status="scheduled"))
    store.transition("gone", ["scheduled"], "cancelled")
    store.transition("sent", ["accepted"], "sent")

    started = store.start_deliveries(["due", "sent", "gone", "unknown"])

    assert [r.status if r is not None else None for r in started] == [
        "accepted", "sent", "cancelled", None
    ]
    store.finish_deliveries(
        [("due", "failed", "boom"), ("sent", "failed", "x"), ("gone", None, None)]
    )
    due, sent = store.get("due"), store.get("sent")
    assert due is not None and (due.status, due.error) == ("failed", "boom")
    assert sent is not None and (sent.status, sent.error) == ("sent", None)  # not accepted
    assert store.claim_due(NOW_MS, limit=10, lease_ms=5000) == []


@pytest.mark.integration
def test_redis_claims_are_exclusive_across_instances(redis_client: redis.Redis) -> None:
    stores = [RedisTriggerStore(redis_client, prefix="test:dispatch") for _ in range(4)]
    for n in range(200):
        stores[0].put_if_absent(record(f"t{n}"))
    claimed: list[list[str]] = [[] for _ in stores]
    barrier = threading.Barrier(len(stores))

    def claim(index: int) -> None:
        barrier.wait()
        while batch := stores[index].claim_due(NOW_MS, limit=7, lease_ms=60_000):
            claimed[index].extend(batch)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    every = [trigger_id for batch in claimed for trigger_id in batch]
    assert sorted(every) == sorted(f"t{n}" for n in range(200))


@pytest.mark.integration
def test_redis_state_survives_an_api_restart(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    clock = MutableClock()
    now_body = make_decision(0).dispatch_body()
    later_body = make_decision(1, send_at_ms=NOW_MS + 600_000).dispatch_body()
    log = tmp_path / "sent.jsonl"  # the same --log file across the restart, as in production

    first_email = RecordingAdapter()
    first_app = create_app(log, store=RedisTriggerStore.from_url(redis_url), clock=clock,
                           adapters={"email": first_email}, scheduler_interval_s=0.01)
    with ServerThread(first_app) as server, httpx.Client(base_url=server.url) as client:
        first_answers = [post(client, now_body).json(), post(client, later_body).json()]
        wait_for(lambda: status_of(client, now_body["trigger_id"]) == "sent")

    # A new process: new app, new store object, the same Redis.
    second_email = RecordingAdapter()
    second_app = create_app(log, store=RedisTriggerStore.from_url(redis_url), clock=clock,
                            adapters={"email": second_email}, scheduler_interval_s=0.01)
    with ServerThread(second_app) as server, httpx.Client(base_url=server.url) as client:
        repeats = [post(client, now_body).json(), post(client, later_body).json()]
        assert repeats == first_answers
        assert status_of(client, now_body["trigger_id"]) == "sent"
        assert status_of(client, later_body["trigger_id"]) == "scheduled"

        clock.advance(timedelta(minutes=10))

        wait_for(lambda: status_of(client, later_body["trigger_id"]) == "sent")

    assert first_email.ids() == [now_body["trigger_id"]]
    assert second_email.ids() == [later_body["trigger_id"]]
    # Repeats are not logged again: each trigger stands once in the log.
    assert sorted(row["trigger_id"] for row in log_lines(log)) == sorted(
        [now_body["trigger_id"], later_body["trigger_id"]])


def test_a_trigger_stored_but_never_logged_is_logged_when_it_is_sent_again(
    tmp_path: Path,
) -> None:
    """A process killed between storing a trigger and logging it never sent it."""
    store = InMemoryTriggerStore()
    log = tmp_path / "sent.jsonl"
    body = make_decision(0).dispatch_body()
    with ServerThread(create_app(log, store=store)) as server, \
            httpx.Client(base_url=server.url) as client:
        post(client, body)
    log.write_bytes(b"")  # the line the killed process never wrote
    with ServerThread(create_app(log, store=store)) as server, \
            httpx.Client(base_url=server.url) as client:
        assert post(client, body).status_code == 202
        assert post(client, body).status_code == 202
    assert [row["trigger_id"] for row in log_lines(log)] == [body["trigger_id"]]


@pytest.mark.integration
def test_build_app_with_redis_keeps_state_there_and_reads_contacts(
    redis_url: str, redis_client: redis.Redis
) -> None:
    redis_client.hset("profile:u0", mapping={"email": "u0@example.com", "name": "Ada"})
    app = build_app(None, redis_url=redis_url)

    assert isinstance(app.state.store, RedisTriggerStore)
    assert app.state.scheduler._contacts.contact("u0") == Contact(
        "u0", name="Ada", email="u0@example.com"
    )


def test_build_app_refuses_an_unreachable_redis() -> None:
    with pytest.raises(ServiceError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0"):
        build_app(None, redis_url="redis://127.0.0.1:1/0")


def test_healthz_answers_container_health_checks_without_credentials() -> None:
    with ServerThread(create_app(token="s3cret")) as server:
        answer = httpx.get(f"{server.url}/healthz")
        refused = httpx.get(f"{server.url}/api/trigger/status/x")
    assert (answer.status_code, answer.json()) == (200, {"status": "alive"})
    assert refused.status_code == 401


# -- outcomes: delivery, and the webhook's opened and clicked ---------------------------------


def test_store_records_delivery_and_engagement_events_once(store: TriggerStore) -> None:
    store.put_if_absent(record("a"))
    store.put_if_absent(record("b"))
    store.put_if_absent(record("c", status="scheduled"))
    store.start_deliveries(["a", "b"])
    finished = store.finish_deliveries([("a", "sent", None), ("b", "failed", "boom"),
                                        ("c", "sent", None)], NOW_MS)
    assert finished == ["a", "b"]  # c was never started: not accepted, nothing set

    async def go() -> None:
        _, opened = await store.arecord_event("a", "opened", NOW_MS + 5)
        _, clicked = await store.arecord_event("a", "clicked", NOW_MS + 9)
        _, again = await store.arecord_event("a", "clicked", NOW_MS + 20)
        assert (opened, clicked, again) == (["opened"], ["clicked"], [])
        failed, none = await store.arecord_event("b", "opened", NOW_MS)
        assert failed is not None and failed.status == "failed" and none == []
        unknown, _ = await store.arecord_event("zzz", "opened", NOW_MS)
        assert unknown is None
        assert await store.aevents("a") == {"sent": NOW_MS, "opened": NOW_MS + 5,
                                            "clicked": NOW_MS + 9}
        assert await store.aevents("b") == {"failed": NOW_MS}
        assert await store.aevents("c") == {}
        await store.aclose()

    asyncio.run(go())


def test_a_click_reported_first_records_the_open_with_it(store: TriggerStore) -> None:
    store.put_if_absent(record("a"))
    store.start_deliveries(["a"])
    store.finish_deliveries([("a", "sent", None)], NOW_MS)

    async def go() -> None:
        _, recorded = await store.arecord_event("a", "clicked", NOW_MS + 7)
        assert recorded == ["opened", "clicked"]
        assert await store.aevents("a") == {"sent": NOW_MS, "opened": NOW_MS + 7,
                                            "clicked": NOW_MS + 7}
        await store.aclose()

    asyncio.run(go())


def test_the_webhook_records_opens_and_clicks_of_sent_messages_in_the_outcomes_log(
    tmp_path: Path,
) -> None:
    outcomes = tmp_path / "outcomes.jsonl"
    failing = RecordingAdapter("sms", error="provider down")
    app = create_app(clock=fixed_now, run_scheduler=False, outcomes_log=outcomes,
                     adapters={"sms": failing})
    sent_body = make_decision(1).dispatch_body()
    failed_body = {**make_decision(2).dispatch_body(), "channel": "sms"}
    later = make_decision(3, send_at_ms=NOW_MS + 3_600_000).dispatch_body()
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        for body in (sent_body, failed_body, later):
            assert post(client, body).status_code == 202
        assert app.state.scheduler.run_once() == 2
        sent_id, failed_id = sent_body["trigger_id"], failed_body["trigger_id"]

        opened = client.post(f"/api/trigger/{sent_id}/events",
                             json={"event": "opened", "at": "2026-03-01T10:20:00Z"})
        assert opened.status_code == 200, opened.text
        assert opened.json() == {"trigger_id": sent_id, "event": "opened",
                                 "recorded": ["opened"]}
        clicked = client.post(f"/api/trigger/{sent_id}/events", json={"event": "clicked"})
        assert clicked.json()["recorded"] == ["clicked"]
        repeat = client.post(f"/api/trigger/{sent_id}/events", json={"event": "opened"})
        assert repeat.json()["recorded"] == []

        assert "failed" in assert_error(
            client.post(f"/api/trigger/{failed_id}/events", json={"event": "opened"}), 409)
        assert "scheduled" in assert_error(client.post(
            f"/api/trigger/{later['trigger_id']}/events", json={"event": "clicked"}), 409)
        assert_error(client.post("/api/trigger/nope/events", json={"event": "opened"}), 404)
        assert_error(client.post(f"/api/trigger/{sent_id}/events", json={"event": "read"}), 400)

        events = client.get(f"/api/trigger/{sent_id}/events").json()
        assert events == {"trigger_id": sent_id, "events": {
            "clicked": "2026-03-01T10:15:00Z", "opened": "2026-03-01T10:20:00Z",
            "sent": "2026-03-01T10:15:00Z",
        }}
        assert client.get(f"/api/trigger/{failed_id}/events").json()["events"] == {
            "failed": "2026-03-01T10:15:00Z"}
        assert_error(client.get("/api/trigger/nope/events"), 404)
        assert client.options(f"/api/trigger/{sent_id}/events").headers["allow"] == "GET, POST"

    lines = log_lines(outcomes)
    assert [(line["trigger_id"], line["outcome"]) for line in lines] == [
        (sent_id, "sent"), (failed_id, "failed"), (sent_id, "opened"), (sent_id, "clicked"),
    ]
    assert {line["trigger_type"] for line in lines} == {"cart_abandonment"}
    assert lines[-2]["ts"] == "2026-03-01T10:20:00Z"
