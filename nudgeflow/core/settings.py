"""Settings of a live run: one pydantic-settings tree, read once at the entry point.

Every field can come from the environment (`NUDGEFLOW_…`, nested with `__`,
for example `NUDGEFLOW_KAFKA__BOOTSTRAP`) or from a command-line flag that
overrides it. Nothing below the entry point reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from nudgeflow.core.resources import DEFAULT_RULES, DEFAULT_TEMPLATES

__all__ = ["DEFAULT_RULES", "DEFAULT_TEMPLATES", "CollectSettings", "Settings", "load_settings"]


class KafkaSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    bootstrap: str = "127.0.0.1:9092"
    input_topic: str = "events"
    dead_letter_topic: str = "events.dlq"
    # triggers the dispatch API kept refusing, or never answered for give_up_after_s
    triggers_dlq_topic: str = "triggers.dlq"
    decisions_topic: str = "triggers.decisions"
    # one line per converted trigger (nudgeflow.core.outcomes), keyed by user
    outcomes_topic: str = "triggers.outcomes"
    group_id: str = "nudgeflow"
    # librdkafka waits this long before refetching an emptied queue; its 1000 ms
    # default stalls a Python consumer that drains fast.
    fetch_queue_backoff_ms: int = Field(default=10, ge=0)


class RedisSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str = "redis://127.0.0.1:6379/0"
    profile_cache_ttl_s: float = Field(default=60.0, gt=0)
    profile_cache_size: int = Field(default=100_000, gt=0)


class DispatchSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str = "http://127.0.0.1:8080"
    token: SecretStr | None = None
    # Requests in flight per sink partition (batches count one each). Fresh connections
    # opened all at once are slow to set up; batches carry the load (batch_max).
    max_in_flight: int = Field(default=16, ge=1)
    # Decisions handed to a partition and not yet answered; past it the flow waits.
    max_queued: int = Field(default=4096, ge=1)
    # Decisions waiting together go out in one POST {url}/api/triggers of up to this many
    # (1: never); an API without that endpoint (404, 405) gets single requests only.
    batch_max: int = Field(default=100, ge=1)
    # Sink partitions (each one event loop and pool); default: one per worker of the run.
    partitions: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=0.15, gt=0)
    # Answers that refuse a trigger (5xx, 429) before it is dead-lettered.
    max_attempts: int = Field(default=5, ge=1)
    # How long a trigger waits for an API that does not answer at all (unreachable,
    # timing out, circuit open) before it is dead-lettered: an outage is waited out.
    give_up_after_s: float = Field(default=600.0, gt=0)
    backoff_base_s: float = Field(default=0.05, gt=0)
    backoff_max_s: float = Field(default=2.0, gt=0)
    # HMAC-SHA256 of "<timestamp>.<body>" in X-Nudgeflow-Signature (nudgeflow.sinks.dispatch);
    # never logged.
    hmac_secret: SecretStr | None = None
    # Circuit breaker (nudgeflow.sinks.circuit): open after this many consecutive failed attempts,
    # then let one probe through every `circuit_open_s`; the sink waits meanwhile.
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_open_s: float = Field(default=1.0, gt=0)


class CollectSettings(BaseModel):
    """`nudgeflow collect`: the HTTP collector in front of the input topic (nudgeflow.collect)."""

    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8088, ge=0, le=65535)
    # The Basic-auth user names (Segment's write keys) that may send; none: every call is 401.
    # From the environment as a JSON list: NUDGEFLOW_COLLECT__WRITE_KEYS='["key1","key2"]'.
    write_keys: list[SecretStr] = Field(default_factory=list)
    # Segment's own limits: 32 KB a call, 500 KB a batch.
    max_body_bytes: int = Field(default=512 * 1024, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1)
    # Token bucket per write key, in events: `rate_per_key` a second, bursts of `burst_per_key`.
    rate_per_key: float = Field(default=5000.0, gt=0)
    burst_per_key: int = Field(default=20_000, ge=1)
    # Browser origins allowed by CORS; ["*"] allows any.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    # A call whose events Kafka has not acknowledged by then answers 503 (librdkafka's
    # message.timeout.ms); the tracker retries after `retry_after_s`.
    delivery_timeout_s: float = Field(default=5.0, gt=0)
    retry_after_s: int = Field(default=2, ge=1)
    # How long the start waits for the brokers before refusing to start.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # A call waits for its acknowledgement, so a linger adds straight to its latency; the
    # events of concurrent calls still travel together while a request is in flight.
    linger_ms: float = Field(default=0.0, ge=0)


class Settings(BaseSettings):
    """Everything a live run needs."""

    model_config = SettingsConfigDict(
        env_prefix="NUDGEFLOW_", env_nested_delimiter="__", frozen=True
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    dispatch: DispatchSettings = DispatchSettings()
    collect: CollectSettings = CollectSettings()
    rules: Path = DEFAULT_RULES
    templates: Path = DEFAULT_TEMPLATES
    workers: int = Field(default=1, ge=1)
    # The detect step is keyed by this many shards of users (0: one key per user). Fixed
    # for the life of a recovery directory: a user's state lives in their shard's snapshot.
    detect_shards: int = Field(default=64, ge=0, le=65_536)
    # A user quiet for this long (up to twice it) is held as their ~0.6 KB snapshot until
    # their next event or timer, instead of as ~4 KB of live objects (0: never).
    detect_park_after_s: float = Field(default=60.0, ge=0)
    # A bytewax cluster across processes: this process's index and every process's host:port.
    process_id: int | None = Field(default=None, ge=0)
    addresses: list[str] | None = None
    # Recovery: snapshots every `snapshot_interval_s` into `recovery_dir` (None: no recovery).
    recovery_dir: Path | None = None
    recovery_partitions: int = Field(default=1, ge=1)
    snapshot_interval_s: float = Field(default=10.0, gt=0)
    # /healthz, /readyz and /metrics; port 0 turns them off. Process i of a cluster uses port + i.
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=9100, ge=0, le=65535)
    log_level: str = "INFO"


def load_settings(
    *,
    brokers: str | None = None,
    topic: str | None = None,
    dead_letter_topic: str | None = None,
    dispatch_url: str | None = None,
    redis_url: str | None = None,
    rules: Path | None = None,
    workers: int | None = None,
    **overrides: object,
) -> Settings:
    """Settings from the environment, with command-line flags (when given) on top."""
    from pydantic import ValidationError

    from nudgeflow.core.errors import ConfigError

    try:
        base = Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = "NUDGEFLOW_" + "__".join(str(p).upper() for p in first["loc"])
        msg = f"bad setting {where}: {first['msg']}"
        raise ConfigError(msg) from None
    kafka = base.kafka.model_copy(
        update={
            k: v
            for k, v in {
                "bootstrap": brokers, "input_topic": topic, "dead_letter_topic": dead_letter_topic
            }.items()
            if v is not None
        }
    )
    redis = base.redis.model_copy(update={"url": redis_url} if redis_url is not None else {})
    dispatch = base.dispatch.model_copy(
        update={"url": dispatch_url} if dispatch_url is not None else {}
    )
    update: dict[str, object] = {"kafka": kafka, "redis": redis, "dispatch": dispatch}
    if rules is not None:
        update["rules"] = rules
    if workers is not None:
        update["workers"] = workers
    update.update({k: v for k, v in overrides.items() if v is not None})
    return base.model_copy(update=update)
