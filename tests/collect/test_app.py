"""The collector's HTTP contract, every refusal included, against in-memory sinks.

Kafka and Redis for real: tests/integration/test_collector.py.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from nudgeflow.collect.app import CollectorApp, Limits, RedisUnavailableError
from nudgeflow.collect.identify import ProfileUpdate
from nudgeflow.collect.producer import KafkaUnavailableError
from nudgeflow.core.events import Event

KEY = "wk_test"
TS = "2026-03-01T10:00:00Z"


@dataclass
class MemorySink:
    events: list[Event] = field(default_factory=list)
    dead: list[tuple[bytes, str]] = field(default_factory=list)
    fail: str | None = None
    healthy: bool = True

    async def write(self, events: Sequence[Event],
                    dead_letters: Sequence[tuple[bytes, str]]) -> None:
        if self.fail is not None:
            raise KafkaUnavailableError(self.fail)
        self.events.extend(events)
        self.dead.extend(dead_letters)


@dataclass
class MemoryProfiles:
    written: list[ProfileUpdate] = field(default_factory=list)
    down: bool = False

    async def write(self, updates: Sequence[ProfileUpdate]) -> None:
        if self.down:
            msg = "Redis did not store the profiles: connection refused"
            raise RedisUnavailableError(msg)
        self.written.extend(updates)

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def basic(key: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def event(event_id: str = "e1", **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": "u1", "type": "page_view", "ts": TS, **fields}


@dataclass
class Harness:
    sink: MemorySink
    profiles: MemoryProfiles
    clock: Clock
    app: CollectorApp

    def request(self, method: str, path: str, *, body: bytes | Any = b"",
                headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
                return await client.request(method, path, content=content,
                                            headers=headers or {})

        return asyncio.run(go())

    def post(self, path: str, body: bytes | Any, **headers: str) -> httpx.Response:
        return self.request("POST", path, body=body, headers={**basic(KEY), **headers})


def harness(limits: Limits | None = None, *, redis: bool = True) -> Harness:
    sink, profiles, clock = MemorySink(), MemoryProfiles(), Clock()
    app = CollectorApp(sink, write_keys=[KEY], profiles=profiles if redis else None,
                       limits=limits or Limits(), clock=clock)
    return Harness(sink, profiles, clock, app)


@pytest.fixture
def h() -> Harness:
    return harness()


def test_a_batch_answers_what_was_taken_and_each_rejection_with_its_reason(h: Harness) -> None:
    body = [event("e1"), event("e2", type="add_to_cart"), {"event_id": "e3"}]
    answer = h.post("/v1/events", body)
    assert answer.status_code == 200
    assert answer.json() == {"accepted": 1, "rejected": [
        {"index": 1, "reason": "missing field 'product_id' (required for add_to_cart)"},
        {"index": 2, "reason": "missing field 'user_id'; missing field 'type'; "
                               "missing field 'ts'"},
    ]}
    assert [e.event_id for e in h.sink.events] == ["e1"]
    # every rejected event is a dead letter, with its bytes and its reason
    assert [orjson.loads(raw)["event_id"] for raw, _ in h.sink.dead] == ["e2", "e3"]
    assert h.sink.dead[0][1].startswith("missing field 'product_id'")


def test_a_call_with_nothing_taken_is_400_with_the_same_body(h: Harness) -> None:
    answer = h.post("/v1/track", {"messageId": "m", "userId": "u", "timestamp": TS,
                                  "event": "Coupon Applied"})
    assert answer.status_code == 400
    assert answer.json()["accepted"] == 0
    assert "unsupported Segment track event" in answer.json()["rejected"][0]["reason"]
    assert len(h.sink.dead) == 1


def test_a_body_that_is_not_json_is_400_and_dead_lettered(h: Harness) -> None:
    answer = h.post("/v1/batch", b"{not json")
    assert answer.status_code == 400
    assert answer.json()["rejected"][0]["reason"].startswith("not valid JSON")
    assert h.sink.dead == [(b"{not json", answer.json()["rejected"][0]["reason"])]


def test_an_empty_batch_is_400(h: Harness) -> None:
    answer = h.post("/v1/batch", {"batch": []})
    assert answer.status_code == 400
    assert answer.json() == {"accepted": 0, "rejected": [], "error": "the call has no events"}


@pytest.mark.parametrize("headers", [
    {}, basic("wrong"), {"authorization": "Basic !!!"}, {"authorization": "Bearer wk_test"},
])
def test_no_valid_write_key_is_401(h: Harness, headers: dict[str, str]) -> None:
    answer = h.request("POST", "/v1/events", body=orjson.dumps(event()), headers=headers)
    assert answer.status_code == 401
    assert "write key" in answer.json()["error"]
    assert answer.headers["www-authenticate"].startswith("Basic")
    assert h.sink.events == [] and h.sink.dead == []


def test_the_write_key_may_come_in_the_query_or_the_body_as_segment_sends_it(h: Harness) -> None:
    assert h.request("POST", f"/v1/events?writeKey={KEY}",
                     body=orjson.dumps(event("q"))).status_code == 200
    call = {"writeKey": KEY, "messageId": "b", "userId": "u", "timestamp": TS, "name": "home"}
    assert h.request("POST", "/v1/page", body=orjson.dumps(call)).status_code == 200
    assert [e.event_id for e in h.sink.events] == ["q", "b"]


def test_a_body_over_the_limit_is_413_before_it_is_read() -> None:
    h = harness(Limits(max_body_bytes=2048))
    answer = h.post("/v1/events", b"[" + b" " * 3000 + b"]")
    assert answer.status_code == 413
    assert answer.json() == {"error": "the body is larger than 2048 bytes"}


def test_a_batch_over_the_limit_is_413_and_nothing_is_written() -> None:
    h = harness(Limits(max_batch_events=2))
    answer = h.post("/v1/events", [event("a"), event("b"), event("c")])
    assert answer.status_code == 413
    assert answer.json() == {"error": "a call carries at most 2 events (got 3)"}
    assert h.sink.events == []


def test_the_rate_limit_per_write_key_is_429_with_retry_after() -> None:
    h = harness(Limits(rate_per_key=10.0, burst_per_key=3, max_batch_events=3))
    assert h.post("/v1/events", [event("a"), event("b")]).status_code == 200
    answer = h.post("/v1/events", [event("c"), event("d")])
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "1"
    assert "rate limit" in answer.json()["error"]
    h.clock.now += 0.1  # one token back: still not enough for two
    assert h.post("/v1/events", [event("c"), event("d")]).status_code == 429
    h.clock.now += 0.1
    assert h.post("/v1/events", [event("c"), event("d")]).status_code == 200
    assert [e.event_id for e in h.sink.events] == ["a", "b", "c", "d"]


def _samples(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_kafka_unavailable_is_503_with_retry_after(h: Harness) -> None:
    h.sink.fail = "Kafka did not take the events: Local: Message timed out"
    rejected = _samples("nudgeflow_collect_rejected_total", reason="invalid_event")
    refused = _samples("nudgeflow_collect_refused_total", reason="kafka_unavailable")
    answer = h.post("/v1/events", [event(), {"event_id": "x"}])
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert "timed out" in answer.json()["error"]
    # the call counts as refused; its items count when its retry is answered
    assert _samples("nudgeflow_collect_refused_total", reason="kafka_unavailable") == refused + 1
    assert _samples("nudgeflow_collect_rejected_total", reason="invalid_event") == rejected


def test_redis_unavailable_for_identify_is_503(h: Harness) -> None:
    h.profiles.down = True
    answer = h.post("/v1/identify", {"userId": "u1", "traits": {"segment": "vip"}})
    assert answer.status_code == 503
    assert "Redis" in answer.json()["error"]
    assert answer.headers["retry-after"] == "2"


def test_identify_updates_the_profile(h: Harness) -> None:
    answer = h.post("/v1/identify", {"userId": "u1", "traits": {"opt_in": "email"}})
    assert answer.status_code == 200
    assert answer.json() == {"accepted": 1, "rejected": []}
    assert h.profiles.written == [ProfileUpdate("u1", {"opt_in": "email"})]


def test_identify_without_redis_is_rejected_with_its_reason() -> None:
    h = harness(redis=False)
    answer = h.post("/v1/identify", {"userId": "u1", "traits": {"opt_in": "email"}})
    assert answer.status_code == 400
    assert "without Redis" in answer.json()["rejected"][0]["reason"]


def test_an_unsupported_content_type_is_415(h: Harness) -> None:
    answer = h.post("/v1/events", b"a=b", **{"content-type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 415
    assert "JSON" in answer.json()["error"]


def test_unknown_paths_are_404_and_other_methods_405(h: Harness) -> None:
    missing = h.request("POST", "/v1/screen", body=b"{}", headers=basic(KEY))
    assert missing.status_code == 404
    assert missing.json() == {"error": "no such endpoint /v1/screen"}
    wrong = h.request("GET", "/v1/track")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST, OPTIONS"
    assert h.request("POST", "/healthz").status_code == 405


def test_cors_preflight_and_answers_carry_the_origin() -> None:
    h = harness(Limits(cors_origins=("https://shop.example",)))
    preflight = h.request("OPTIONS", "/v1/events", headers={
        "origin": "https://shop.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    answer = h.post("/v1/events", [event()], origin="https://shop.example")
    assert answer.headers["access-control-allow-origin"] == "https://shop.example"


def test_an_origin_not_allowed_is_403() -> None:
    h = harness(Limits(cors_origins=("https://shop.example",)))
    answer = h.post("/v1/events", [event()], origin="https://evil.example")
    assert answer.status_code == 403
    assert answer.json() == {"error": "origin not allowed"}
    assert "access-control-allow-origin" not in answer.headers
    assert h.sink.events == []


def test_health_readiness_metrics_and_the_tracker(h: Harness) -> None:
    assert h.request("GET", "/healthz").json() == {"status": "alive"}
    assert h.request("GET", "/readyz").status_code == 200
    h.sink.healthy = False
    assert h.request("GET", "/readyz").status_code == 503
    h.post("/v1/events", [event(), {"nope": 1}])
    metrics = h.request("GET", "/metrics").text
    assert 'nudgeflow_collect_rejected_total{reason="invalid_event"}' in metrics
    assert 'nudgeflow_collect_accepted_total{endpoint="events",kind="event"}' in metrics
    tracker = h.request("GET", "/tracker.js")
    assert tracker.headers["content-type"].startswith("text/javascript")
    assert b"sendBeacon" in tracker.content


def test_a_streamed_body_over_the_limit_is_413_without_reading_all_of_it() -> None:
    h = harness(Limits(max_body_bytes=2048))
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):  # 100 KB offered, without a Content-Length
            sent.append(1)
            yield b" " * 1024

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=h.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            return await client.post("/v1/events", content=chunks(), headers=basic(KEY))

    answer = asyncio.run(go())
    assert answer.status_code == 413
    assert answer.json() == {"error": "the body is larger than 2048 bytes"}
    assert h.sink.events == [] and h.sink.dead == []
    assert len(sent) < 100  # it stopped reading at the limit


def test_analytics_js_short_paths_with_the_key_in_a_text_body(h: Harness) -> None:
    """analytics.js posts `text/plain` JSON to /v1/t, /v1/p, … with `writeKey` in the body."""
    call = {"type": "track", "event": "Product Viewed", "messageId": "ajs-1",
            "anonymousId": "a1", "timestamp": TS, "writeKey": KEY,
            "properties": {"product_id": "p1"}, "sentAt": TS, "_metadata": {}}
    answer = h.request("POST", "/v1/t", body=orjson.dumps(call),
                       headers={"content-type": "text/plain"})
    assert answer.status_code == 200
    [taken] = h.sink.events
    assert (taken.event_id, taken.type, taken.page_type) == ("ajs-1", "page_view", "product")
