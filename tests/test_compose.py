"""docker-compose.yml and the Dockerfile, checked without Docker (scripts/compose-e2e.sh runs them).

The point is what breaks silently: an environment variable that `Settings` does
not know is ignored, a missing health check turns `depends_on` into a race, and
a topic name that differs from the settings leaves the flow reading nothing.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import BaseModel

from nudgeflow.core.settings import KafkaSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
E2E_SCRIPT = ROOT / "scripts" / "compose-e2e.sh"
PREFIX = "NUDGEFLOW_"
OUR_SERVICES = ("dispatch-api", "collector", "flow")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the `- NAME=value` form
        env = dict(item.split("=", 1) for item in env)
    assert isinstance(env, dict)
    assert all(isinstance(value, str) for value in env.values()), "quote env values in YAML"
    return env


def _pairs(text: str, separator: str) -> dict[str, str]:
    """`"A://x,B://y"` -> {"A": "x", "B": "y"}."""
    return dict(item.split(separator, 1) for item in text.split(","))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def _settings_field_path(variable: str) -> list[str]:
    """`NUDGEFLOW_KAFKA__BOOTSTRAP` -> ["kafka", "bootstrap"], checked against `Settings`."""
    assert variable.startswith(PREFIX), variable
    path = variable.removeprefix(PREFIX).lower().split("__")
    model: type[BaseModel] = Settings
    for depth, name in enumerate(path):
        assert name in model.model_fields, f"{variable}: {model.__name__} has no field {name!r}"
        annotation = model.model_fields[name].annotation
        if depth < len(path) - 1:
            assert isinstance(annotation, type) and issubclass(annotation, BaseModel), variable
            model = annotation
        else:
            is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            assert not is_model, f"{variable} names a whole section, not a field"
    return path


def test_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {
        "kafka", "redis", "topics", "dispatch-api", "collector", "flow", "prometheus", "grafana",
    }
    assert services["kafka"]["image"] == "apache/kafka:3.9.1"
    assert services["topics"]["image"] == "apache/kafka:3.9.1"
    assert services["redis"]["image"] == "redis:7-alpine"


def test_our_services_share_one_image_built_here(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name]["image"] for name in OUR_SERVICES}
    assert len(images) == 1
    for name in OUR_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert services["dispatch-api"]["command"] == [
        "dispatch-api",
        "--host",
        "0.0.0.0",  # inside the container; published on loopback only
        "--port",
        "8080",
    ]
    assert services["flow"]["command"] == ["run"]
    assert services["collector"]["command"] == ["collect", "--host", "0.0.0.0", "--port", "8088"]


def test_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["kafka"])
    assert env["KAFKA_NODE_ID"] == "1"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = _pairs(env["KAFKA_LISTENERS"], "://")
    advertised = _pairs(env["KAFKA_ADVERTISED_LISTENERS"], "://")
    protocols = _pairs(env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"], ":")
    assert set(listeners) == set(protocols)
    assert set(advertised) <= set(listeners)
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller not in advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    # Other containers reach kafka:9092; the host reaches 127.0.0.1:9094.
    assert "kafka:9092" in advertised.values()
    assert "127.0.0.1:9094" in advertised.values()
    voter_port = listeners[controller].rsplit(":", 1)[1]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@kafka:{voter_port}"
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[name] == "1", name
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])


def test_ports_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    assert services["kafka"]["ports"] == ["127.0.0.1:9094:9094"]
    assert services["dispatch-api"]["ports"] == ["127.0.0.1:8080:8080"]
    # The health port: /dashboard for a person on the host (Prometheus scrapes inside).
    assert services["flow"]["ports"] == ["127.0.0.1:9100:9100"]
    assert "ports" not in services["topics"]
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_health_checks(services: dict[str, dict[str, Any]]) -> None:
    kafka = " ".join(services["kafka"]["healthcheck"]["test"])
    assert "/opt/kafka/bin/kafka-topics.sh" in kafka and "--list" in kafka
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    api = services["dispatch-api"]["healthcheck"]["test"]
    assert api[:3] == ["CMD", "python", "-c"]
    assert "urllib.request" in api[3] and "http://127.0.0.1:8080/healthz" in api[3]
    compile(api[3], "healthcheck", "exec")  # the one-liner is valid Python
    collector = services["collector"]["healthcheck"]["test"]
    assert collector[:3] == ["CMD", "python", "-c"]
    assert "http://127.0.0.1:8088/readyz" in collector[3]
    compile(collector[3], "healthcheck", "exec")


def test_topics_job(services: dict[str, dict[str, Any]]) -> None:
    topics = services["topics"]
    assert topics["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert topics["restart"] == "no"  # quoted: a bare `no` is YAML for false
    script = " ".join(topics["command"])
    created = dict(re.findall(r"--create --if-not-exists --topic (\S+) --partitions (\d+)", script))
    assert created == {
        "events": "6",
        "events.dlq": "1",
        "triggers.decisions": "6",
        "triggers.outcomes": "6",
        "triggers.dlq": "1",
    }
    # The names the flow uses by default are the ones created.
    kafka = KafkaSettings()
    assert {kafka.input_topic, kafka.dead_letter_topic, kafka.decisions_topic,
            kafka.outcomes_topic, kafka.triggers_dlq_topic} <= set(created)


def test_flow_starts_after_its_dependencies(services: dict[str, dict[str, Any]]) -> None:
    assert services["flow"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
        "dispatch-api": {"condition": "service_healthy"},
    }


def test_collector_starts_after_kafka_the_topics_and_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    assert services["collector"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }
    assert services["collector"]["ports"] == ["127.0.0.1:8088:8088"]


def test_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    for name in ("kafka", "redis", "dispatch-api", "collector", "flow", "prometheus", "grafana"):
        assert services[name]["restart"] == "unless-stopped", name


def test_our_services_are_configured_only_by_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in OUR_SERVICES:
        service = services[name]
        for key in ("volumes", "env_file", "configs", "secrets"):
            assert key not in service, f"{name}: {key}"
        assert all(var.startswith(PREFIX) for var in _environment(service)), name


def test_flow_environment(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["flow"])
    assert env == {
        "NUDGEFLOW_KAFKA__BOOTSTRAP": "kafka:9092",
        "NUDGEFLOW_REDIS__URL": "redis://redis:6379/0",
        "NUDGEFLOW_DISPATCH__URL": "http://dispatch-api:8080",
        "NUDGEFLOW_WORKERS": "2",
        # inside its container: Prometheus scrapes it from another one
        "NUDGEFLOW_HEALTH_HOST": "0.0.0.0",
    }


def test_every_nudgeflow_variable_is_a_settings_field(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    variables = dict(_dockerfile_env())
    for name in OUR_SERVICES:
        variables.update(_environment(services[name]))
    ours = {name: value for name, value in variables.items() if name.startswith(PREFIX)}
    assert ours
    paths = {name: _settings_field_path(name) for name in ours}
    # And pydantic-settings reads them as meant.
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, text in ours.items():
        monkeypatch.setenv(name, text)
    settings = Settings()
    for name, path in paths.items():
        value: Any = settings
        for part in path:
            value = getattr(value, part)
        if isinstance(value, list):  # a JSON list, of secrets (write keys) or plain values
            value = orjson.dumps([getattr(v, "get_secret_value", lambda v=v: v)()
                                  for v in value]).decode()
        assert str(value) == ours[name], name


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest.split(" AS ")[0] for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 2  # the build stage (a compiler) and the image
    # Pinned to a patch release of 3.11 slim (optionally a digest too), never a moving tag.
    for base in froms:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base)
    assert froms[0] == froms[1], "the wheel is built for the image's own Python"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    # The build stage compiles the detection (setup.py); the image installs only the wheel.
    assert "NUDGEFLOW_MYPYC=1 pip wheel --no-cache-dir --no-deps -w /wheels ." in runs
    assert "pip install --no-cache-dir /wheels/*.whl" in runs
    # The rules and templates are package data: nothing may point outside the package.
    assert "NUDGEFLOW_RULES" not in _dockerfile_env()
    assert ("ENTRYPOINT", '["nudgeflow"]') in instructions
    assert ("CMD", '["run"]') in instructions


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".services", ".git", "tests", "bench/results", "**/__pycache__"):
        assert entry in ignored, entry


def test_e2e_script_is_marked_as_not_run_in_ci() -> None:
    text = E2E_SCRIPT.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash")
    assert "NOT RUN IN CI" in text
    assert "docker compose" in text and "kafka-console-producer.sh" in text
    assert E2E_SCRIPT.stat().st_mode & 0o111, "make it executable"


def _copied_sources() -> list[str]:
    """The build-context paths the Dockerfile COPYs (sources only, the last word is the target)."""
    sources: list[str] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


def _ignored(relative: str, patterns: list[str]) -> bool:
    parts = Path(relative).parts
    for raw in patterns:
        pattern = raw.rstrip("/")
        if fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, f"{pattern}/*"):
            return True
        if pattern.startswith("**/") and any(
            fnmatch.fnmatch(part, pattern.removeprefix("**/")) for part in parts
        ):
            return True
    return False


def test_the_image_build_context_makes_a_complete_wheel(tmp_path: Path) -> None:
    """What the Dockerfile copies builds a wheel with every module, the rules and the templates.

    The image once ran `nudgeflow run` into `templates directory … does not exist`:
    this builds the wheel from exactly the files `COPY` takes (less .dockerignore)
    and compares it with the package in the repository.
    """
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = tmp_path / "context"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for source in _copied_sources():
        for relative in tracked:
            inside = fnmatch.fnmatch(relative, source) or relative.startswith(f"{source}/")
            if inside and not _ignored(relative, patterns):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, context / relative)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(context)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("nudgeflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if ".dist-info/" not in name}
    expected = {
        relative for relative in tracked
        if relative.startswith("nudgeflow/")
        and Path(relative).suffix in {".py", ".yaml", ".j2", ".html", ".js"}
    }
    assert expected <= shipped, sorted(expected - shipped)
    assert "nudgeflow/config/rules.yaml" in shipped
    assert "nudgeflow/core/web/dashboard.html" in shipped
    assert "nudgeflow/py.typed" in shipped
    assert "nudgeflow/collect/static/tracker.js" in shipped  # served at /tracker.js
    assert {name.split("/")[0] for name in shipped} == {"nudgeflow"}, "only nudgeflow is installed"
