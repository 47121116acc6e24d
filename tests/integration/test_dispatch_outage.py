"""A dispatch API outage is waited out: every trigger arrives once, none is dead-lettered.

The real reference API runs as its own process, with its idempotency store in
the real Redis so it survives a restart; the live flow runs on real Kafka. The
API is killed (SIGKILL) while triggers are being decided, stays down for 30 s,
and comes back on the same port.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from confluent_kafka import Producer
from kafka_helpers import TopicFactory, consume_all
from live_helpers import produce_by_partition, read_api_log, start_flow, three_product_views
from rule_texts import THIRD_LOOK_RULES

from nudgeflow.bench.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 30.0
RULES = THIRD_LOOK_RULES


def _start_api(port: int, log: Path, redis_url: str) -> subprocess.Popen[bytes]:
    api = subprocess.Popen(
        [sys.executable, "-m", "nudgeflow", "dispatch-api", "--host", "127.0.0.1",
         "--port", str(port), "--log", str(log), "--redis-url", redis_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return api
        except httpx.HTTPError:
            time.sleep(0.1)
    api.kill()
    pytest.fail("the dispatch API did not start")


def test_an_api_down_for_30_s_loses_nothing_and_dead_letters_nothing(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis,
    make_topic: TopicFactory, tmp_path: Path,
) -> None:
    topic = make_topic(partitions=1, prefix="outage")
    dlq = make_topic(partitions=1, prefix="outage-triggers-dlq")
    users = [f"outage-{uuid.uuid4().hex[:8]}-{n}" for n in range(60)]
    for user in users:
        redis_client.hset(f"profile:{user}", mapping={"segment": "regular", "opt_in": "email"})
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port, log = free_port(), tmp_path / "api.jsonl"
    api_redis = redis_url.rsplit("/", 1)[0] + "/3"  # the API's own store, not the profiles
    redis.Redis.from_url(api_redis).flushdb()
    api = _start_api(port, log, api_redis)
    flow = start_flow(kafka_bootstrap, topic, f"http://127.0.0.1:{port}", redis_url,
                      "--rules", str(rules),
                      env={"NUDGEFLOW_KAFKA__TRIGGERS_DLQ_TOPIC": dlq,
                           "NUDGEFLOW_HEALTH_PORT": "0"},
                      stdout=subprocess.DEVNULL)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    now = int(time.time() * 1000)
    try:
        first, rest = users[:20], users[20:]
        views = [m for u in first for m in three_product_views(u, now)]
        produce_by_partition(producer, topic, views, 1)
        deadline = time.monotonic() + 60
        while len(read_api_log(log)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Down while triggers are in flight, and while more are decided.
        api.send_signal(signal.SIGKILL)
        api.wait()
        down_at = time.monotonic()
        views = [m for u in rest for m in three_product_views(u, now)]
        produce_by_partition(producer, topic, views, 1)
        time.sleep(OUTAGE_S - (time.monotonic() - down_at))  # the outage itself, not a wait
        api = _start_api(port, log, api_redis)
        deadline = time.monotonic() + 60
        while len({r["user_id"] for r in read_api_log(log)}) < len(users):
            assert time.monotonic() < deadline, (
                f"{len({r['user_id'] for r in read_api_log(log)})} of {len(users)} arrived")
            assert flow.poll() is None, "the flow stopped"
            time.sleep(0.1)
    finally:
        flow.send_signal(signal.SIGTERM)
        _, err = flow.communicate(timeout=60)
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
    rows = read_api_log(log)
    assert sorted(r["user_id"] for r in rows) == sorted(users), "each trigger exactly once"
    assert consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=3) == [], (
        err or b"").decode(errors="replace")[-2000:]
    assert flow.returncode == 0
