"""A Kafka broker restart is ridden out: every trigger arrives once, nothing is dead-lettered.

The test runs a broker of its own (the project's script, on private ports and
a private data directory, the jars the suite already fetched), so that it can
stop and start it without disturbing the other tests' broker. The live flow
runs as `nudgeflow run`; the broker is stopped while triggers are in flight,
stays down for 10 s, and comes back with its data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from kafka_helpers import consume_all, wait_for_topic
from live_helpers import produce_by_partition, read_api_log, start_flow, three_product_views
from rule_texts import THIRD_LOOK_RULES

from nudgeflow.bench.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "scripts" / "services.sh"
OUTAGE_S = 10.0
RULES = THIRD_LOOK_RULES


class PrivateBroker:
    """`scripts/services.sh kafka-up | kafka-down` on ports and a directory of this test's."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "SERVICES_DIR": str(directory),
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(free_port()),
        }
        libs = ROOT / ".services" / "kafka" / "libs"
        if libs.is_dir():  # the suite's own broker fetched them: no second download
            self.env["KAFKA_LIBS"] = str(libs)
        self.bootstrap = f"127.0.0.1:{self.port}"

    def up(self) -> None:
        subprocess.run(["bash", str(SERVICES), "kafka-up"], env=self.env, check=True,
                       timeout=300, stdout=subprocess.DEVNULL)

    def down(self) -> None:
        subprocess.run(["bash", str(SERVICES), "kafka-down"], env=self.env, check=True,
                       timeout=60, stdout=subprocess.DEVNULL)


def _wait_for_users(log: Path, users: list[str], flow: subprocess.Popen[bytes],
                    timeout_s: float, flow_log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while len({r["user_id"] for r in read_api_log(log)}) < len(users):
        arrived = len({r["user_id"] for r in read_api_log(log)})
        assert time.monotonic() < deadline, (
            f"{arrived} of {len(users)} arrived; the flow said: "
            + flow_log.read_text(errors="replace")[-3000:])
        assert flow.poll() is None, "the flow stopped"
        time.sleep(0.1)


def test_a_broker_down_for_10_s_loses_nothing_and_dead_letters_nothing(
    redis_url: str, redis_client: redis.Redis, dispatch_api: tuple[str, Path], tmp_path: Path,
) -> None:
    broker = PrivateBroker(tmp_path / "services")
    broker.up()
    api_url, log = dispatch_api
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for name in (topic, f"{topic}.dlq", f"{topic}.decisions", f"{topic}.triggers-dlq"):
        admin.create_topics([NewTopic(name, 1, 1)])[name].result(timeout=30)
        wait_for_topic(admin, name, 1)
    users = [f"restart-{uuid.uuid4().hex[:8]}-{n}" for n in range(40)]
    for user in users:
        redis_client.hset(f"profile:{user}", mapping={"segment": "regular", "opt_in": "email"})
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    flow_log = tmp_path / "flow.log"
    with flow_log.open("wb") as flow_err:
        flow = start_flow(broker.bootstrap, topic, api_url, redis_url, "--rules", str(rules),
                          env={"NUDGEFLOW_KAFKA__TRIGGERS_DLQ_TOPIC": f"{topic}.triggers-dlq",
                               "NUDGEFLOW_HEALTH_PORT": "0"},
                          stdout=subprocess.DEVNULL, stderr=flow_err)
    now = int(time.time() * 1000)
    first, rest = users[:20], users[20:]
    try:
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        views = [m for u in first for m in three_product_views(u, now)]
        produce_by_partition(producer, topic, views, 1)
        _wait_for_users(log, first, flow, timeout_s=90, flow_log=flow_log)
        broker.down()
        time.sleep(OUTAGE_S)  # the outage itself, not a wait for a result
        assert flow.poll() is None, "the flow stopped while the broker was down"
        broker.up()
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        views = [m for u in rest for m in three_product_views(u, now)]
        produce_by_partition(producer, topic, views, 1)
        _wait_for_users(log, users, flow, timeout_s=120, flow_log=flow_log)
    finally:
        flow.send_signal(signal.SIGTERM)
        flow.wait(timeout=60)
        dead = consume_all(broker.bootstrap, f"{topic}.triggers-dlq", expected=1, timeout_s=3)
        broker.down()
    rows = read_api_log(log)
    assert sorted(r["user_id"] for r in rows) == sorted(users), "each trigger exactly once"
    said = flow_log.read_text(errors="replace")[-3000:]
    assert dead == [], said
    assert flow.returncode == 0, said
