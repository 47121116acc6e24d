"""Running the collector: `serve(settings)` for `nudgeflow collect`, `CollectorThread` for tests.

The server stack is uvicorn with uvloop and httptools under a pure ASGI app,
as the reference dispatch API's fast path: measured on this machine
(`python -m nudgeflow.bench.collector`), see README "Collecting events".
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from typing import Any

import uvicorn

from nudgeflow.collect.app import CollectorApp, Limits, RedisUnavailableError
from nudgeflow.collect.identify import ProfileUpdate
from nudgeflow.collect.producer import EventWriter, producer_config
from nudgeflow.core.errors import ConfigError, ServiceError
from nudgeflow.core.settings import CollectSettings, Settings
from nudgeflow.serving import LOOPBACK, AsgiThread

__all__ = ["CollectorThread", "RedisProfiles", "build_collector", "serve"]

log = logging.getLogger(__name__)


class RedisProfiles:
    """Identify calls into the `profile:<user_id>` hashes, one pipeline a call."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0
        )

    async def write(self, updates: Sequence[ProfileUpdate]) -> None:
        import redis

        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for update in updates:
                    pipe.hset(update.key, mapping=update.fields)
                await pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            msg = f"Redis did not store the profiles: {exc}"
            raise RedisUnavailableError(msg) from None

    async def close(self) -> None:
        await self._client.aclose()


def _limits(collect: CollectSettings) -> Limits:
    if collect.burst_per_key < collect.max_batch_events:
        msg = (f"NUDGEFLOW_COLLECT__BURST_PER_KEY ({collect.burst_per_key}) must be at least "
               f"MAX_BATCH_EVENTS ({collect.max_batch_events}): a full batch could never pass")
        raise ConfigError(msg)
    return Limits(
        max_body_bytes=collect.max_body_bytes, max_batch_events=collect.max_batch_events,
        rate_per_key=collect.rate_per_key, burst_per_key=collect.burst_per_key,
        cors_origins=tuple(collect.cors_origins), retry_after_s=collect.retry_after_s,
    )


def build_collector(settings: Settings, *, check_kafka: bool = True) -> tuple[
    CollectorApp, EventWriter
]:
    """The app and its writer (close it when done). Refuses to start without a write key,
    or (with `check_kafka`) when Kafka cannot be reached within `connect_timeout_s`."""
    from confluent_kafka import Producer

    collect = settings.collect
    keys = [key.get_secret_value() for key in collect.write_keys]
    if not keys:
        msg = "no write key: pass --write-key KEY (or NUDGEFLOW_COLLECT__WRITE_KEYS='[\"KEY\"]')"
        raise ConfigError(msg)
    limits = _limits(collect)
    if check_kafka:
        _check_kafka(settings, collect.connect_timeout_s)
    config = producer_config(settings.kafka.bootstrap,
                             delivery_timeout_s=collect.delivery_timeout_s,
                             linger_ms=collect.linger_ms)
    # librdkafka's own messages (a broker gone, a reconnect) as JSON log lines, from the
    # polling thread.
    producer = Producer({**config, "logger": logging.getLogger("nudgeflow.collect.kafka")})
    writer = EventWriter(
        producer, topic=settings.kafka.input_topic,
        dead_letter_topic=settings.kafka.dead_letter_topic,
        delivery_timeout_s=collect.delivery_timeout_s,
    )
    redis_url = settings.redis.url
    profiles = None if redis_url.lower() == "none" else RedisProfiles(redis_url)
    app = CollectorApp(writer, write_keys=keys, profiles=profiles, limits=limits)
    return app, writer


def _check_kafka(settings: Settings, timeout_s: float) -> None:
    """Refuse to start when the brokers cannot be reached; warn of a missing topic."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # A silent client: the one-line error below says it all.
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap, "log_level": 0})
    try:
        known = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        msg = f"Kafka at {settings.kafka.bootstrap} cannot be reached: {exc.args[0].str()}"
        raise ServiceError(msg) from None
    for topic in (settings.kafka.input_topic, settings.kafka.dead_letter_topic):
        if topic not in known:
            log.warning("topic %s does not exist: unless the brokers create topics on "
                        "first use, every call will answer 503", topic)


def serve(settings: Settings) -> None:
    """`nudgeflow collect` in the foreground until interrupted."""
    app, writer = build_collector(settings)
    # uvicorn stops on SIGTERM, then raises it again once its own handlers are gone: this
    # handler takes it, so the writer is closed and a container stop exits 0.
    signal.signal(signal.SIGTERM, _taken)
    try:
        # loop/http "auto": uvloop and httptools. No access log: a line per call costs more
        # than the call.
        uvicorn.run(
            app, host=settings.collect.host, port=settings.collect.port, log_level="warning",
            access_log=False, ws="none", loop="auto", http="auto", lifespan="on",
            proxy_headers=False,
        )
    finally:
        writer.close()


def _taken(_signum: int, _frame: object) -> None:
    """A SIGTERM uvicorn has already acted on."""


class CollectorThread(AsgiThread):
    """The collector's app served on a background thread; a context manager."""

    def __init__(self, app: Any, *, host: str = LOOPBACK, port: int = 0) -> None:
        super().__init__(app, name="collector", host=host, port=port, graceful_shutdown_s=2)
