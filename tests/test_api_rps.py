"""`python -m nudgeflow.bench.api_rps`: short runs, to show it measures and verifies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
import redis

from nudgeflow.bench import api_rps
from nudgeflow.dispatch_api.server import ServerThread, create_app


def run_bench(tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "rps.json"
    code = api_rps.main(["--seconds", "1", "--warmup", "0.2", "--runs", "1",
                         "--concurrency", "4", "--batch-size", "20", "--json", str(out), *args])
    assert code == 0
    document: dict[str, object] = orjson.loads(out.read_bytes())
    return document


def test_measures_single_and_batch_requests(tmp_path: Path) -> None:
    document = run_bench(tmp_path)

    summary = document["summary"]
    assert isinstance(summary, dict)
    assert set(summary) == {"single", "batch"}
    for figures in summary.values():
        assert figures["accepted_per_s_median"] > 0
        assert figures["log_delay_ms_p50_median"] < 100  # a reader of the log sees it at once
    runs = document["runs"]
    assert isinstance(runs, list)
    assert all(run["triggers_total"] >= run["triggers_in_window"] > 0 for run in runs)


def test_two_raw_client_processes(tmp_path: Path) -> None:
    document = run_bench(tmp_path, "--clients", "2", "--client", "raw", "--mode", "single")

    [run] = document["runs"]  # type: ignore[misc]
    assert run["accepted_per_s"] > 0


@pytest.mark.integration
def test_with_redis_leaves_nothing_behind(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    document = run_bench(tmp_path, "--redis-url", redis_url, "--mode", "single")

    assert document["summary"]["single"]["accepted_per_s_median"] > 0  # type: ignore[index]
    assert list(redis_client.scan_iter(match="nudgeflow:dispatch:trigger:*")) == []
    assert redis_client.zcard("nudgeflow:dispatch:due") == 0


def test_verify_refuses_a_log_that_lost_a_trigger(tmp_path: Path) -> None:
    log = tmp_path / "api.jsonl"
    log.write_bytes(b'{"trigger_id": "p-0"}\n')
    result = api_rps.ClientResult(sent=2, accepted=2)

    with pytest.raises(AssertionError, match="1 missing"):
        api_rps.verify(log, [result], ["p"])


def test_raw_client_reads_the_answers_of_the_reference_api(tmp_path: Path) -> None:
    log = tmp_path / "api.jsonl"

    async def go(url: str) -> api_rps.ClientResult:
        return await api_rps.drive(
            url, mode="batch", concurrency=2, batch_size=5, id_prefix="r",
            start_at=time.time(), warmup_s=0.0, seconds=0.3, client="raw",
        )

    with ServerThread(create_app(log)) as server:
        result = asyncio.run(go(server.url))

    assert result.failures == {}
    assert result.accepted == result.sent > 0
    api_rps.verify(log, [result], ["r"])
    assert set(result.answered_at) == {f"r-{n}" for n in range(0, result.sent, 50)}
