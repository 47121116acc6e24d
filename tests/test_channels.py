"""Channel adapters against real servers on loopback: SMTP (aiosmtpd) and an HTTP receiver.

Also the whole path through the reference API: POST a trigger, the scheduler
delivers it through the adapter, and the status becomes `sent` or `failed`.
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from nudgeflow.core.errors import ConfigError
from nudgeflow.dispatch_api.channels import (
    Contact,
    DeliveryError,
    HttpProvider,
    Message,
    SmtpEmail,
    StaticContacts,
    parse_host_port,
)
from nudgeflow.dispatch_api.server import ServerThread, build_adapters, create_app

TRIGGER_BODY: dict[str, Any] = {
    "trigger_id": "t-1",
    "trigger_type": "cart_abandonment",
    "user_id": "u1",
    "fired_at": "2026-03-01T10:00:00Z",
    "detected_at": "2026-03-01T10:00:00.012Z",
    "segment": "vip",
    "metadata": {"cart_value": 150.0, "items": [{"product_id": "p1", "quantity": 1}]},
    "send_at": None,
}


# -- a real SMTP server ----------------------------------------------------------------------


class Mailbox:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


class _BoundController(Controller):
    """A Controller on a socket bound beforehand: port 0 picks a free port, race-free."""

    def __init__(self, handler: Mailbox, sock: socket.socket) -> None:
        self._sock = sock
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


@pytest.fixture
def smtp_server() -> Iterator[tuple[str, int, Mailbox]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    mailbox = Mailbox()
    controller = _BoundController(mailbox, sock)
    controller.start()
    host, port = sock.getsockname()[:2]
    try:
        yield host, port, mailbox
    finally:
        controller.stop()
        sock.close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_smtp_email_is_delivered(smtp_server: tuple[str, int, Mailbox]) -> None:
    host, port, mailbox = smtp_server
    adapter = SmtpEmail(host, port, sender="shop@example.com")

    adapter.send(
        Message("Your cart misses you", "Hi Ada,\n\nyour cart is waiting."),
        Contact("u1", email="ada@example.com"),
        trigger_id="t-1",
    )

    [mail] = mailbox.messages
    assert mailbox.recipients == [["ada@example.com"]]
    assert mail["Subject"] == "Your cart misses you"
    assert mail["From"] == "shop@example.com"
    assert mail["X-Nudgeflow-Trigger-Id"] == "t-1"
    assert mail.get_content().replace("\r\n", "\n").strip() == "Hi Ada,\n\nyour cart is waiting."


def test_smtp_without_email_address_fails() -> None:
    adapter = SmtpEmail("127.0.0.1", closed_port())

    with pytest.raises(DeliveryError, match="no email address for user u1"):
        adapter.send(Message("s", "b"), Contact("u1"), trigger_id="t")


def test_smtp_server_down_fails() -> None:
    adapter = SmtpEmail("127.0.0.1", closed_port(), timeout_s=2.0)

    with pytest.raises(DeliveryError, match=r"email: SMTP 127\.0\.0\.1:"):
        adapter.send(Message("s", "b"), Contact("u1", email="a@example.com"), trigger_id="t")


# -- a real HTTP receiver --------------------------------------------------------------------


class Receiver:
    """A loopback HTTP server that records POSTs and answers `status`."""

    def __init__(self, status: int = 202) -> None:
        self.status = status
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = orjson.loads(self.rfile.read(length))
                receiver.requests.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/send"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def test_sms_is_posted_to_the_provider(receiver: Receiver) -> None:
    adapter = HttpProvider("sms", receiver.url)
    try:
        adapter.send(Message(None, "Your cart is waiting"), Contact("u1", phone="+4915100000"),
                     trigger_id="t-1")
    finally:
        adapter.close()

    [(headers, body)] = receiver.requests
    assert body == {"channel": "sms", "to": "+4915100000", "body": "Your cart is waiting",
                    "trigger_id": "t-1"}
    assert headers["Idempotency-Key"] == "t-1"


def test_push_carries_the_title(receiver: Receiver) -> None:
    adapter = HttpProvider("push", receiver.url)
    try:
        adapter.send(Message("Still there?", "p1 is in your cart"),
                     Contact("u1", push_token="tok-1"), trigger_id="t-2")
    finally:
        adapter.close()

    [(_, body)] = receiver.requests
    assert body["to"] == "tok-1"
    assert body["title"] == "Still there?"


def test_provider_error_fails(receiver: Receiver) -> None:
    receiver.status = 503
    adapter = HttpProvider("sms", receiver.url)
    try:
        with pytest.raises(DeliveryError, match="sms: provider answered HTTP 503"):
            adapter.send(Message(None, "b"), Contact("u1", phone="+1"), trigger_id="t")
    finally:
        adapter.close()


def test_provider_down_and_missing_contact_fail() -> None:
    adapter = HttpProvider("push", f"http://127.0.0.1:{closed_port()}/send")
    try:
        with pytest.raises(DeliveryError, match="no push token for user u1"):
            adapter.send(Message(None, "b"), Contact("u1"), trigger_id="t")
        with pytest.raises(DeliveryError, match=r"push: provider .*ConnectError"):
            adapter.send(Message(None, "b"), Contact("u1", push_token="x"), trigger_id="t")
    finally:
        adapter.close()


def test_http_provider_is_for_sms_and_push_only() -> None:
    with pytest.raises(ConfigError):
        HttpProvider("email", "http://127.0.0.1:1/")


def test_contact_merge_prefers_the_override() -> None:
    base = Contact("u1", name="Ada", email="old@example.com", phone="+1")

    merged = base.merged({"email": "new@example.com", "phone": "", "other": "x"})

    assert merged == Contact("u1", name="Ada", email="new@example.com", phone="+1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:1025", ("127.0.0.1", 1025)), ("[::1]:25", ("::1", 25)),
     ("mail.local:587", ("mail.local", 587))],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["localhost", ":25", "host:0", "host:99999", "host:x"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_host_port(text, what="--smtp")


# -- through the API -------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            msg = "condition not met in time"
            raise AssertionError(msg)
        time.sleep(0.01)


def status_of(client: httpx.Client, trigger_id: str) -> str:
    status: str = client.get(f"/api/trigger/status/{trigger_id}").json()["status"]
    return status


def test_api_sends_email_sms_and_push_through_the_adapters(
    smtp_server: tuple[str, int, Mailbox], receiver: Receiver
) -> None:
    host, port, mailbox = smtp_server
    adapters = build_adapters(smtp=f"{host}:{port}", sms_url=receiver.url, push_url=receiver.url)
    contacts = StaticContacts({"u1": Contact("u1", email="ada@example.com", push_token="tok")})
    bodies = [
        {**TRIGGER_BODY, "trigger_id": "e-1", "channel": "email",
         "message": {"subject": "Hello Ada", "body": "Your cart is waiting."}},
        # the body's own contact: the directory has no phone for u1
        {**TRIGGER_BODY, "trigger_id": "s-1", "channel": "sms",
         "message": {"body": "Ada, your cart is waiting"}, "contact": {"phone": "+4915100000"}},
        {**TRIGGER_BODY, "trigger_id": "p-1", "channel": "push"},  # no message: the fallback
    ]
    app = create_app(adapters=adapters, contacts=contacts, scheduler_interval_s=0.01)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=5.0) as client:
        for body in bodies:
            response = client.post("/api/trigger", json=body,
                                   headers={"Idempotency-Key": body["trigger_id"]})
            assert response.status_code == 202, response.text

        wait_for(lambda: all(status_of(client, b["trigger_id"]) == "sent" for b in bodies))

    [mail] = mailbox.messages
    assert (mail["To"], mail["Subject"]) == ("ada@example.com", "Hello Ada")
    by_channel = {body["channel"]: body for _, body in receiver.requests}
    assert by_channel["sms"]["to"] == "+4915100000"
    assert by_channel["sms"]["body"] == "Ada, your cart is waiting"
    assert by_channel["push"]["to"] == "tok"
    assert by_channel["push"]["body"] == "cart_abandonment for you"


def test_api_delivery_failure_is_status_failed(receiver: Receiver) -> None:
    receiver.status = 500
    app = create_app(adapters=build_adapters(sms_url=receiver.url), scheduler_interval_s=0.01)
    body = {**TRIGGER_BODY, "channel": "sms", "contact": {"phone": "+1"}}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=5.0) as client:
        client.post("/api/trigger", json=body, headers={"Idempotency-Key": body["trigger_id"]})

        wait_for(lambda: status_of(client, body["trigger_id"]) == "failed")
        # the same key again: the first answer, and no second attempt
        again = client.post("/api/trigger", json=body,
                            headers={"Idempotency-Key": body["trigger_id"]})

    assert again.json() == {"trigger_id": body["trigger_id"], "status": "accepted"}
    assert len(receiver.requests) == 1
    record = app.state.store.get(body["trigger_id"])
    assert record.error.startswith("sms: provider answered HTTP 500")

