"""The package as a user gets it: a wheel from `pip wheel`, installed into a fresh venv.

The wheel is built once from the repository, installed with its dependencies
from the package index into a new virtualenv (no system site-packages, no
repository on `sys.path`), and every command below runs as the venv's
`nudgeflow` executable from an empty directory: `rules check`, `demo`,
`replay`, `dispatch-api`, and `run` against the real Kafka and Redis with that
dispatch API. Nothing here imports nudgeflow from the repository, so what runs
is only what the wheel ships: its modules, the default rules and the message
templates as package data.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import redis
from kafka_helpers import TopicFactory, produce

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 600.0  # a cold pip cache downloads every dependency
COMMAND_TIMEOUT_S = 120.0
# The top-level names the code had before it moved under nudgeflow/: none may come back.
OLD_TOP_LEVEL = frozenset({"flows", "operators", "sinks", "bench", "config", "tests", "scripts"})
# What setuptools puts in the wheel from nudgeflow/ (modules and package data).
SHIPPED_SUFFIXES = frozenset({".py", ".typed", ".yaml", ".j2", ".html", ".js", ".json"})

T = TypeVar("T")


# --- building and installing -----------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    path: Path
    source_files: frozenset[str]  # nudgeflow/… files on disk when it was built


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path
    bare_site_packages: frozenset[str]  # the entries of a fresh venv, before the install

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def nudgeflow(self) -> str:
        return str(self.venv / "bin" / "nudgeflow")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points Python at the repository or its venv."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV"}
    env = {
        key: value for key, value in os.environ.items()
        if key not in dropped and not key.startswith("NUDGEFLOW_")
    }
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep)
        if entry and not Path(entry).resolve().is_relative_to(ROOT)
    )
    env.update(extra)
    return env


def _check(command: list[str], *, timeout_s: float, **kwargs: Any) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs
    )
    assert result.returncode == 0, (
        f"{command[:4]} exited {result.returncode}\n{result.stdout[-2000:]}\n"
        f"{result.stderr[-4000:]}"
    )
    return result.stdout


def _package_files(package: Path) -> frozenset[str]:
    return frozenset(
        path.relative_to(package.parent).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in SHIPPED_SUFFIXES
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools' scratch directories go here, not into the checkout: a build/ left in
    # the repository is never cleaned by setuptools, so a later wheel would still ship
    # modules deleted since. The wheel's content is the same either way.
    (out / "egg-info").mkdir()
    extra_config = out / "setuptools.cfg"
    extra_config.write_text(
        f"[build]\nbuild_base = {out / 'build'}\n[egg_info]\negg_base = {out / 'egg-info'}\n",
        encoding="utf-8",
    )
    source_files = _package_files(ROOT / "nudgeflow")
    # The build backend comes from the dev environment (it is in the `dev` extra), as in
    # tests/test_compose.py, so the build itself needs no index.
    _check(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out / "dist"), str(ROOT)],
        timeout_s=INSTALL_TIMEOUT_S, env={**os.environ, "DIST_EXTRA_CONFIG": str(extra_config)},
    )
    (path,) = (out / "dist").glob("nudgeflow-*.whl")
    return Wheel(path, source_files)


@pytest.fixture(scope="module")
def installed(wheel: Wheel, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("venv") / "venv"
    base = shutil.which("python3.11") or sys.executable
    _check([base, "-m", "venv", str(venv)], timeout_s=COMMAND_TIMEOUT_S, env=_clean_env())
    python = str(venv / "bin" / "python")
    site_packages = Path(_check(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        timeout_s=COMMAND_TIMEOUT_S, env=_clean_env(),
    ).strip())
    bare = frozenset(entry.name for entry in site_packages.iterdir())
    _check(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel.path)],
        timeout_s=INSTALL_TIMEOUT_S, env=_clean_env(),
    )
    return Installed(venv, site_packages, bare)


# --- running the installed commands ----------------------------------------------------------


def _empty_dir(tmp_path: Path, name: str = "cwd") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    return directory


def _nudgeflow(
    installed: Installed, cwd: Path, *args: str, timeout_s: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [installed.nudgeflow, *args], cwd=cwd, env=_clean_env(), capture_output=True,
        text=True, timeout=timeout_s, check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args[1:3]} exited {result.returncode}\n{result.stdout[-2000:]}\n"
        f"{result.stderr[-4000:]}"
    )
    assert "Traceback" not in result.stderr
    return result


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    output: Path | None = None,
) -> T:
    """Polls `probe` until it returns something not None; fails when `process` died first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        tail = output.read_text(errors="replace")[-3000:] if output and output.exists() else ""
        if process is not None and process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s:g} s:\n{tail}")
        time.sleep(0.1)


def _get_json(url: str, status: int = 200) -> Any:
    """The body of GET `url` if it answers `status`, else None (including no answer yet)."""
    try:
        response = httpx.get(url, timeout=2.0)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == status else None


def _stop(process: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> int:
    """Signals the process and reaps it, killing it after 30 s; returns its exit code."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            raise
    return process.returncode


def _no_crash(output: Path) -> None:
    text = output.read_text(errors="replace")
    assert "Traceback" not in text and "panicked" not in text, text[-4000:]


# --- the wheel and what it installed ---------------------------------------------------------


_PROBE = """
import importlib.metadata as md, json, sys
import nudgeflow
from nudgeflow.core.resources import DEFAULT_RULES, DEFAULT_TEMPLATES
owned = {}
for dist in md.distributions():
    owned[dist.metadata["Name"]] = sorted(
        {f.parts[0] for f in dist.files or () if f.parts[0] != ".."})
print(json.dumps({
    "owned": owned, "module": nudgeflow.__file__, "rules": str(DEFAULT_RULES),
    "templates": sorted(p.name for p in DEFAULT_TEMPLATES.glob("*.j2")),
    "path": sys.path,
}))
"""


def test_the_wheel_installs_nudgeflow_and_nothing_else(
    wheel: Wheel, installed: Installed, tmp_path: Path
) -> None:
    with zipfile.ZipFile(wheel.path) as archive:
        names = archive.namelist()
        (dist_info,) = {name.split("/")[0] for name in names if ".dist-info/" in name}
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"nudgeflow", dist_info}
    assert top_level == ["nudgeflow"]
    assert re.search(r"^nudgeflow\s*=\s*nudgeflow\.cli:main$", entry_points, re.MULTILINE)
    shipped = {name for name in names if not name.startswith(f"{dist_info}/")}
    # Every module and data file of the package, and nothing else (no stale leftovers).
    missing, extra = wheel.source_files - shipped, shipped - wheel.source_files
    assert not missing and not extra, f"missing: {sorted(missing)}, extra: {sorted(extra)}"
    assert {"nudgeflow/config/rules.yaml", "nudgeflow/py.typed", "nudgeflow/__main__.py"} <= shipped

    probe = orjson.loads(_check(
        [installed.python, "-c", _PROBE], timeout_s=COMMAND_TIMEOUT_S,
        cwd=_empty_dir(tmp_path), env=_clean_env(),
    ))
    owned: dict[str, list[str]] = probe["owned"]
    assert owned["nudgeflow"] == sorted(["nudgeflow", dist_info])
    entries = {entry.name for entry in installed.site_packages.iterdir()}
    gained = entries - installed.bare_site_packages
    unowned = gained - {top for tops in owned.values() for top in tops} - {"__pycache__"}
    assert not unowned, f"site-packages gained entries no distribution records: {unowned}"
    assert not entries & OLD_TOP_LEVEL, sorted(entries & OLD_TOP_LEVEL)
    assert all(not top.startswith("nudgeflow") for name, tops in owned.items()
               if name != "nudgeflow" for top in tops)
    assert (installed.venv / "bin" / "nudgeflow").is_file()

    # The package, its default rules and its templates are the installed ones.
    package = installed.site_packages / "nudgeflow"
    assert Path(probe["module"]) == package / "__init__.py"
    assert Path(probe["rules"]) == package / "config" / "rules.yaml"
    assert "cart_abandonment.email.j2" in probe["templates"]
    assert not any(Path(entry).resolve().is_relative_to(ROOT) for entry in probe["path"] if entry)
    # The dependencies installed from the index satisfy each other.
    _check([installed.python, "-m", "pip", "check"], timeout_s=COMMAND_TIMEOUT_S,
           env=_clean_env())


# --- commands without services ---------------------------------------------------------------


def test_rules_check_passes_the_packaged_rules_and_refuses_a_broken_file(
    wheel: Wheel, installed: Installed, tmp_path: Path
) -> None:
    cwd = _empty_dir(tmp_path)
    copy = _ok(subprocess.run(
        [installed.python, "-c",
         "import importlib.resources as r, sys; "
         "sys.stdout.write(r.files('nudgeflow').joinpath('config/rules.yaml').read_text())"],
        cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        check=False,
    )).stdout
    with zipfile.ZipFile(wheel.path) as archive:
        assert copy == archive.read("nudgeflow/config/rules.yaml").decode()
    (cwd / "rules.yaml").write_text(copy, encoding="utf-8")
    rules = len(re.findall(r"^  - name: ", copy, re.MULTILINE))
    assert rules >= 5

    checked = _ok(_nudgeflow(installed, cwd, "rules", "check", "rules.yaml"))
    assert checked.stdout == f"rules.yaml: ok, {rules} rules\n"
    as_module = _ok(subprocess.run(
        [installed.python, "-m", "nudgeflow", "rules", "check", "rules.yaml"], cwd=cwd,
        env=_clean_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
    ))
    assert as_module.stdout == checked.stdout

    lines = copy.splitlines(keepends=True)
    broken_at = next(n for n, line in enumerate(lines) if line.strip() == "timeout: 15m")
    lines[broken_at] = lines[broken_at].replace("15m", "15 minutes")
    (cwd / "broken.yaml").write_text("".join(lines), encoding="utf-8")
    refused = _nudgeflow(installed, cwd, "rules", "check", "broken.yaml")
    assert refused.returncode == 2, refused.stderr
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"nudgeflow: error: broken.yaml:{broken_at + 1}: "), (
        refused.stderr
    )
    assert "bad duration '15 minutes'" in refused.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["broken.yaml", "rules.yaml"]


def test_demo_dispatches_the_sample_shop_triggers(installed: Installed, tmp_path: Path) -> None:
    cwd, out = _empty_dir(tmp_path), tmp_path / "demo"
    result = _ok(_nudgeflow(installed, cwd, "demo", "--users", "200", "--hours", "1",
                            "--out-dir", str(out)))

    triggers = _jsonl(out / "triggers.jsonl")
    dispatched = [t["trigger_id"] for t in triggers if t["decision"] == "dispatched"]
    assert len(dispatched) >= 10, result.stdout
    assert {t["decision"] for t in triggers} == {"dispatched", "suppressed"}
    received = [row["trigger_id"] for row in _jsonl(out / "dispatch-api.jsonl")]
    assert sorted(received) == sorted(dispatched)
    assert f"accepted {len(dispatched)} of {len(dispatched)} dispatched triggers" in result.stdout
    assert "lift against the holdout" in result.stdout  # the report of what they achieved
    assert (out / "events.jsonl").stat().st_size > 0
    assert (out / "profiles.jsonl").stat().st_size > 0
    assert not any(cwd.iterdir()), "demo wrote into the working directory"


def test_demo_serve_serves_the_dashboard_from_the_installed_package(
    installed: Installed, tmp_path: Path
) -> None:
    """The page and its script are package data: served from the wheel, from any directory."""
    demo = subprocess.Popen(
        [installed.nudgeflow, "demo", "--users", "30", "--hours", "0.5", "--serve",
         "--port", "0"],
        cwd=_empty_dir(tmp_path), env=_clean_env(), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert demo.stdout is not None
        url = ""
        for line in demo.stdout:  # the URL is printed after the run's report
            if line.startswith("dashboard: "):
                url = line.split()[1]
                break
        assert url.endswith("/dashboard"), "the demo ended without serving"
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and '<script src="dashboard.js">' in page.text
        assert "dashboard.json" in httpx.get(f"{url}.js", timeout=10).text
        assert httpx.get(f"{url}.json", timeout=10).json()["events"]["total"] > 0
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=COMMAND_TIMEOUT_S) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=COMMAND_TIMEOUT_S)
        if demo.stdout is not None:
            demo.stdout.close()


REPLAY_EVENTS = b"""\
{"event_id":"r-1","user_id":"rp-a","type":"add_to_cart","ts":"2026-03-01T10:00:00Z","product_id":"p1","quantity":2,"price":25.0}
{"event_id":"r-2","user_id":"rp-d","type":"add_to_cart","ts":"2026-03-01T10:01:00Z","product_id":"p2","price":5}
{"event_id":"r-3","user_id":"rp-c","type":"add_to_cart","ts":"2026-03-01T10:05:00Z"}

{"event_id":"r-4","user_id":"rp-b","type":"page_view","ts":"2026-03-01T10:20:00Z","page_type":"home"}
"""


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_replay_fires_the_cart_reminders_due_by_the_end_of_the_input(
    installed: Installed, tmp_path: Path
) -> None:
    """Two carts left 19 and 20 minutes before another user's last event: both reminders
    are due (15 min) by the end of the input. Only rp-a has a profile with an opt-in."""
    cwd, inputs = _empty_dir(tmp_path), _empty_dir(tmp_path, "in")
    (inputs / "events.jsonl").write_bytes(REPLAY_EVENTS)
    (inputs / "profiles.jsonl").write_bytes(
        b'{"user_id": "rp-a", "segment": "regular", "opt_in": "email"}\n'
    )
    result = _ok(_nudgeflow(
        installed, cwd, "replay", str(inputs / "events.jsonl"),
        "--profiles", str(inputs / "profiles.jsonl"), "--out", str(inputs / "triggers.jsonl"),
    ))

    rows = _jsonl(inputs / "triggers.jsonl")
    by_user = {row["user_id"]: row for row in rows}
    assert len(rows) == 2 and set(by_user) == {"rp-a", "rp-d"}, rows
    end = _at("2026-03-01T10:20:00Z")
    a, d = by_user["rp-a"], by_user["rp-d"]
    assert a["trigger_type"] == d["trigger_type"] == "cart_abandonment"
    assert _at(a["fired_at"]) == _at("2026-03-01T10:15:00Z")
    assert _at(d["fired_at"]) == _at("2026-03-01T10:16:00Z")
    assert _at(a["detected_at"]) == _at(d["detected_at"]) == end  # replay: the end bound
    assert (a["decision"], a["reason"], a["channel"], a["segment"]) == (
        "dispatched", None, "email", "regular"
    )
    assert _at(a["send_at"]) == end
    assert a["metadata"] == {
        "cart_value": 50.0, "items": [{"product_id": "p1", "quantity": 2, "price": 25.0}]
    }
    assert (d["decision"], d["reason"], d["channel"], d["segment"]) == (
        "suppressed", "no_channel", None, "new"
    )
    assert uuid.UUID(a["trigger_id"]) != uuid.UUID(d["trigger_id"])

    (letter,) = _jsonl(inputs / "triggers.dlq.jsonl")
    assert letter["line"] == 3
    assert "product_id" in letter["reason"]
    assert "3 applied" in result.stderr and "1 invalid" in result.stderr, result.stderr
    assert not any(cwd.iterdir()), "replay wrote into the working directory"


# --- the reference dispatch API and the live flow --------------------------------------------


@dataclass(frozen=True)
class Api:
    url: str
    log: Path


@pytest.fixture(scope="module")
def installed_api(
    installed: Installed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """`nudgeflow dispatch-api` of the venv, started from an empty directory."""
    base = tmp_path_factory.mktemp("api")
    cwd, log, output = base / "cwd", base / "api.jsonl", base / "api.out"
    cwd.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [installed.nudgeflow, "dispatch-api", "--port", str(port), "--log", str(log)],
            cwd=cwd, env=_clean_env(), stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for("answer on /healthz", lambda: _get_json(f"{url}/healthz"),
                  timeout_s=30, process=process, output=output)
        yield Api(url, log)
    finally:
        code = _stop(process)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15.
    text = output.read_text(errors="replace")
    if code not in {0, -signal.SIGTERM} or "Traceback" in text:
        pytest.fail(f"dispatch-api exited {code}:\n{text[-3000:]}")
    if any(cwd.iterdir()):
        pytest.fail("dispatch-api wrote into the working directory")


def _trigger(trigger_id: str, *, send_at: datetime | None = None) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "trigger_id": trigger_id,
        "trigger_type": "cart_abandonment",
        "user_id": "wheel-api-user",
        "fired_at": (now - timedelta(minutes=15)).isoformat().replace("+00:00", "Z"),
        "detected_at": now.isoformat().replace("+00:00", "Z"),
        "segment": "regular",
        "metadata": {"cart_value": 10.0,
                     "items": [{"product_id": "p1", "quantity": 1, "price": 10.0}]},
        "channel": "email",
        "send_at": (send_at or now).isoformat().replace("+00:00", "Z"),
    }


def test_dispatch_api_accepts_a_trigger_once_and_reports_its_status(installed_api: Api) -> None:
    url = installed_api.url
    trigger_id = f"wheel-{uuid.uuid4()}"
    body = _trigger(trigger_id)
    with httpx.Client(base_url=url, timeout=5.0) as client:
        first = client.post("/api/trigger", json=body, headers={"Idempotency-Key": trigger_id})
        assert first.status_code == 202, first.text
        assert first.json() == {"trigger_id": trigger_id, "status": "accepted"}
        again = client.post("/api/trigger", json=body, headers={"Idempotency-Key": trigger_id})
        assert (again.status_code, again.json()) == (202, first.json())

        # Without a provider a channel is only recorded: the send completes at once.
        status = _wait_for(
            "status sent",
            lambda: (_get_json(f"{url}/api/trigger/status?trigger_id={trigger_id}") or {})
            .get("status") == "sent" or None,
            timeout_s=10,
        )
        assert status is True
        by_path = client.get(f"/api/trigger/status/{trigger_id}")
        assert by_path.json() == {"trigger_id": trigger_id, "status": "sent"}

        later_id = f"wheel-{uuid.uuid4()}"
        later = _trigger(later_id, send_at=datetime.now(UTC) + timedelta(hours=1))
        scheduled = client.post("/api/trigger", json=later, headers={"Idempotency-Key": later_id})
        assert (scheduled.status_code, scheduled.json()) == (
            202, {"trigger_id": later_id, "status": "scheduled"}
        )
        assert client.get("/api/trigger/status", params={"trigger_id": later_id}).json()[
            "status"] == "scheduled"

        unknown = client.get("/api/trigger/status", params={"trigger_id": "no-such-trigger"})
        assert unknown.status_code == 404 and "error" in unknown.json()
        # A key that is not the body's trigger_id: a client error (EVENTS.md §3: 4xx, JSON).
        mismatch = client.post("/api/trigger", json=body, headers={"Idempotency-Key": "other"})
        assert 400 <= mismatch.status_code < 500 and "error" in mismatch.json(), mismatch.text

    logged = [row for row in _jsonl(installed_api.log) if row["trigger_id"] == trigger_id]
    assert len(logged) == 1 and logged[0]["channel"] == "email"


@dataclass
class LiveRun:
    process: subprocess.Popen[bytes]
    output: Path
    health_url: str


@pytest.fixture
def live_flow(
    installed: Installed,
    installed_api: Api,
    kafka_bootstrap: str,
    redis_url: str,
    make_topic: TopicFactory,
    tmp_path: Path,
) -> Iterator[tuple[LiveRun, str]]:
    """`nudgeflow run` of the venv on a fresh topic, ready; yields (the run, its topic)."""
    topic = make_topic(partitions=1, prefix="wheel-events")
    dead_letters = make_topic(partitions=1, prefix="wheel-dlq")
    decisions = make_topic(partitions=1, prefix="wheel-decisions")
    health_port = _free_port()
    cwd, output = _empty_dir(tmp_path), tmp_path / "run.out"
    env = _clean_env(
        NUDGEFLOW_HEALTH_PORT=str(health_port),
        NUDGEFLOW_KAFKA__DECISIONS_TOPIC=decisions,
        # The first call opens the connection: more than the 150 ms meant for a warm pool.
        NUDGEFLOW_DISPATCH__TIMEOUT_S="2.0",
    )
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [installed.nudgeflow, "run", "--brokers", kafka_bootstrap, "--topic", topic,
             "--dead-letter-topic", dead_letters, "--dispatch-url", installed_api.url,
             "--redis-url", redis_url],
            cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    run = LiveRun(process, output, f"http://127.0.0.1:{health_port}")
    try:
        _wait_for("answer on /readyz", lambda: _get_json(f"{run.health_url}/readyz"),
                  timeout_s=60, process=process, output=output)
        yield run, topic
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    if any(cwd.iterdir()):
        pytest.fail("run wrote into the working directory")


def _page_views(user: str, product: str) -> list[tuple[bytes | None, bytes]]:
    now = int(time.time() * 1000)
    return [
        (user.encode(), orjson.dumps({
            "event_id": f"{user}-view-{n}", "user_id": user, "type": "page_view",
            "ts": now + n, "page_type": "product", "product_id": product,
        }))
        for n in range(3)
    ]


@pytest.fixture
def profiled_user(redis_url: str) -> Iterator[str]:
    """A fresh user with a Redis profile that opts into email."""
    user = f"wheel-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(f"profile:{user}", mapping={"segment": "regular", "opt_in": "email"})
        yield user
    finally:
        client.delete(f"profile:{user}")
        client.close()


def _live_trigger(
    run: LiveRun, topic: str, api: Api, kafka_bootstrap: str, user: str
) -> dict[str, Any]:
    """Three views of one product within 10 minutes: product_interest fires at the third.

    Returns what the dispatch API logged for it, once it arrived.
    """
    produce(kafka_bootstrap, topic, _page_views(user, "p-wheel"))

    def received() -> dict[str, Any] | None:
        rows = [r for r in _jsonl(api.log) if r["user_id"] == user]
        return rows[0] if rows else None

    return _wait_for("trigger at the dispatch API", received, timeout_s=60,
                     process=run.process, output=run.output)


def test_run_dispatches_a_live_trigger_to_the_api_and_stops_on_sigterm(
    live_flow: tuple[LiveRun, str], installed_api: Api, kafka_bootstrap: str, profiled_user: str
) -> None:
    run, topic = live_flow
    row = _live_trigger(run, topic, installed_api, kafka_bootstrap, profiled_user)
    assert row["trigger_type"] == "product_interest"
    assert row["channel"] == "email"
    assert row["segment"] == "regular"
    assert row["metadata"]["product_id"] == "p-wheel" and row["metadata"]["count"] == 3
    # Rendered from the packaged template product_interest.email.j2.
    assert row["message"]["subject"] and "p-wheel" in row["message"]["body"]
    trigger_id = row["trigger_id"]
    _wait_for(
        "status sent",
        lambda: (_get_json(f"{installed_api.url}/api/trigger/status/{trigger_id}") or {})
        .get("status") == "sent" or None,
        timeout_s=10,
    )
    assert _get_json(f"{run.health_url}/healthz")["status"] == "alive"

    code = _stop(run.process, signal.SIGTERM)
    # A container stop: the flow stops as on Ctrl-C and the command exits 0.
    assert code == 0, run.output.read_text(errors="replace")[-3000:]
    _no_crash(run.output)
    assert "flow started" in run.output.read_text(errors="replace")
    assert [r["trigger_id"] for r in _jsonl(installed_api.log)
            if r["user_id"] == profiled_user] == [trigger_id]


def test_run_stops_on_ctrl_c_without_a_traceback(
    live_flow: tuple[LiveRun, str], installed_api: Api, kafka_bootstrap: str, profiled_user: str
) -> None:
    """Ctrl-C on a running flow: exit 130, no traceback."""
    run, topic = live_flow
    _live_trigger(run, topic, installed_api, kafka_bootstrap, profiled_user)
    code = _stop(run.process, signal.SIGINT)
    assert code == 130, run.output.read_text(errors="replace")[-3000:]
    _no_crash(run.output)
