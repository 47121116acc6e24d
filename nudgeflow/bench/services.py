"""The harness's side of the services: topics, pre-filling, profiles, the dispatch API process.

Everything created here is named `bench-…` and removed again by its owner
(`Topics.delete_all`, `Profiles.delete_all`, `DispatchApi.stop`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # NewTopic: stub gap
    AdminClient,
    NewTopic,
)
from redis.typing import EncodableT, FieldT

from nudgeflow.app.samples import SampleLine
from nudgeflow.core.errors import ServiceError

PROFILE_KEY: Final = "profile:{}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: no stray bytewax API."""
    env = dict(os.environ)
    env.pop("BYTEWAX_DATAFLOW_API_ENABLED", None)
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bench_redis_url(redis_url: str, db: int) -> str:
    """`redis_url` on database `db`: the bench never meets the tests' FLUSHDB."""
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


class Topics:
    """Creates uniquely named topics and deletes them all at the end."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000})
        self._created: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]

    def check(self) -> None:
        try:
            self._admin.list_topics(timeout=5)
        except KafkaException as exc:
            msg = f"cannot reach Kafka at {self.bootstrap}: {exc} (scripts/services.sh up)"
            raise ServiceError(msg) from None

    def create(self, label: str, partitions: int = 1) -> str:
        """A new topic `bench-<run>-<label>[-n]`, ready (leaders elected) when returned."""
        name = f"bench-{self.run_id}-{label}"
        count = sum(1 for created in self._created if created.startswith(name))
        if count:
            name = f"{name}-{count + 1}"
        futures = self._admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=30, request_timeout=30,
        )
        futures[name].result(timeout=60)
        self._created.append(name)
        deadline = time.monotonic() + 30
        while True:
            info = self._admin.list_topics(topic=name, timeout=5).topics.get(name)
            ready = (
                info is not None and info.error is None
                and len(info.partitions) == partitions
                and all(p.leader >= 0 for p in info.partitions.values())
            )
            if ready:
                return name
            if time.monotonic() > deadline:
                msg = f"topic {name} not ready after 30 s"
                raise ServiceError(msg)
            time.sleep(0.1)

    def delete_all(self) -> None:
        if not self._created:
            return
        futures = self._admin.delete_topics(self._created, operation_timeout=30)
        for future in futures.values():
            with contextlib.suppress(KafkaException):
                future.result(timeout=60)
        self._created.clear()


def bulk_producer(bootstrap: str) -> Producer:
    return Producer({
        "bootstrap.servers": bootstrap,
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 512 * 1024,
    })


def produce_lines(bootstrap: str, topics: Iterable[str], lines: Iterable[SampleLine],
                  *, user_prefix: bytes = b"") -> int:
    """Every line to every topic, keyed by its user (as a shop's tracker would key them)."""
    producer = bulk_producer(bootstrap)
    names = list(topics)
    count = 0
    for line in lines:
        key = user_prefix + line.user_id.encode()
        for topic in names:
            while True:
                try:
                    producer.produce(topic, value=line.data, key=key)
                    break
                except BufferError:
                    producer.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        msg = f"{remaining} messages not delivered to {names}"
        raise ServiceError(msg)
    return count


class Profiles:
    """Profile hashes in the bench's Redis database, written in pipelines, deleted at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = redis.Redis.from_url(url)
        self._keys: list[str] = []

    def check(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
            msg = f"cannot reach Redis at {self.url}: {exc} (scripts/services.sh up)"
            raise ServiceError(msg) from None

    def write(self, profiles: Iterable[dict[str, Any]], *, user_prefix: str = "") -> int:
        pipe = self._client.pipeline(transaction=False)
        count = 0
        for profile in profiles:
            key = PROFILE_KEY.format(user_prefix + profile["user_id"])
            mapping: dict[FieldT, EncodableT] = {
                k: (",".join(v) if isinstance(v, list) else str(v))
                for k, v in profile.items() if k != "user_id"
            }
            pipe.delete(key)
            if mapping:
                pipe.hset(key, mapping=mapping)
            self._keys.append(key)
            count += 1
            if count % 2000 == 0:
                pipe.execute()
        pipe.execute()
        return count

    def delete_all(self) -> None:
        for start in range(0, len(self._keys), 5000):
            self._client.delete(*self._keys[start : start + 5000])
        self._keys.clear()

    def close(self) -> None:
        self._client.close()


class DispatchApi:
    """The reference dispatch API (`nudgeflow dispatch-api`) in a process of its own.

    A process, not a thread of the harness: the harness's paced producer must not
    share a GIL with the server whose answer times are being measured.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "nudgeflow", "dispatch-api", "--host", "127.0.0.1",
             "--port", str(self.port), "--log", str(self.log_path)],
            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                msg = f"dispatch API exited at start: {err[-500:]}"
                raise ServiceError(msg)
            try:
                urllib.request.urlopen(f"{self.url}/api/trigger/status/ping", timeout=1)
            except urllib.error.HTTPError:
                return  # 404: up and answering
            except OSError:
                time.sleep(0.1)
                continue
            return
        self.stop()
        msg = f"dispatch API did not answer on {self.url} within {timeout_s} s"
        raise ServiceError(msg)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()

    def rows(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines()
                if line.strip()]

    def __enter__(self) -> DispatchApi:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to put started processes in; every one still running is stopped at exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            stop_process(proc)
