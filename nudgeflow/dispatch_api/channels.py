"""Channel adapters of the reference dispatch API: how a message reaches a customer.

    ChannelAdapter.send(message, contact, trigger_id=…)     raises DeliveryError
    ├── SmtpEmail          email over SMTP (plain text, one connection per message)
    ├── HttpProvider       SMS or push: POST JSON to a provider URL
    └── RecordOnly         nothing leaves; the API's JSON-lines log is the record

Where the contact details come from is a separate concern, `ContactDirectory`:
the dispatch body's optional `contact` object first, then the directory
(`RedisContacts` reads the profile hash `profile:<user_id>`: `email`, `phone`,
`push_token`, `name`, as TRIGGERS.md "Segments" lists them).

Adapters are synchronous and thread-safe: the API's scheduler calls them from a
small thread pool. Each has its own timeout, well below the scheduler's lease,
so a hung provider cannot make a trigger be sent twice.
"""

from __future__ import annotations

import smtplib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.message import EmailMessage
from typing import Any, Final, Protocol

import httpx
import redis

from nudgeflow.core.errors import ConfigError, ServiceError
from nudgeflow.core.triggers import Channel

__all__ = [
    "ChannelAdapter",
    "Contact",
    "ContactDirectory",
    "DeliveryError",
    "HttpProvider",
    "Message",
    "NoContacts",
    "RecordOnly",
    "RedisContacts",
    "SmtpEmail",
    "StaticContacts",
    "parse_host_port",
]

PROFILE_KEY: Final = "profile:{}"
_ERROR_TEXT_LIMIT: Final = 200


class DeliveryError(ServiceError):
    """A channel could not deliver a message; the trigger's status becomes `failed`."""

    def __init__(self, channel: str, reason: str) -> None:
        self.channel = channel
        self.reason = reason
        super().__init__(f"{channel}: {reason}")


@dataclass(frozen=True, slots=True)
class Message:
    """What is sent: `subject` (email subject, push title) and `body`."""

    subject: str | None
    body: str


@dataclass(frozen=True, slots=True)
class Contact:
    """How to reach one customer; any field may be unknown."""

    user_id: str
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None

    def merged(self, override: Mapping[str, Any] | None) -> Contact:
        """This contact with the non-empty string fields of `override` on top."""
        if not override:
            return self
        fields = {
            key: value
            for key in ("name", "email", "phone", "push_token")
            if isinstance(value := override.get(key), str) and value
        }
        return replace(self, **fields)


class ChannelAdapter(Protocol):
    """Delivers a message on one channel; raises `DeliveryError` when it cannot."""

    @property
    def channel(self) -> Channel: ...

    def send(self, message: Message, contact: Contact, *, trigger_id: str) -> None: ...


class RecordOnly:
    """Sends nothing: used for a channel without a provider (the API log is the record)."""

    def __init__(self, channel: Channel) -> None:
        self._channel: Channel = channel

    @property
    def channel(self) -> Channel:
        return self._channel

    def send(self, message: Message, contact: Contact, *, trigger_id: str) -> None:
        return None


class SmtpEmail:
    """Plain-text email over SMTP; one connection per message (no pooling to go stale)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        sender: str = "nudgeflow@localhost",
        timeout_s: float = 10.0,
        local_hostname: str = "localhost",
    ) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._timeout_s = timeout_s
        self._local_hostname = local_hostname

    @property
    def channel(self) -> Channel:
        return "email"

    def send(self, message: Message, contact: Contact, *, trigger_id: str) -> None:
        if not contact.email:
            raise DeliveryError(self.channel, f"no email address for user {contact.user_id}")
        mail = EmailMessage()
        mail["From"] = self._sender
        mail["To"] = contact.email
        mail["Subject"] = message.subject or ""
        mail["X-Nudgeflow-Trigger-Id"] = trigger_id
        mail.set_content(message.body)
        try:
            with smtplib.SMTP(
                self._host,
                self._port,
                timeout=self._timeout_s,
                local_hostname=self._local_hostname,
            ) as smtp:
                smtp.send_message(mail)
        except smtplib.SMTPException as exc:
            raise DeliveryError(self.channel, f"SMTP {self._host}:{self._port}: {exc}") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DeliveryError(self.channel, f"SMTP {self._host}:{self._port}: {reason}") from None


class HttpProvider:
    """SMS or push through a provider's HTTP API.

    POSTs `{"channel", "to", "body", "title"?, "trigger_id"}` as JSON, with the
    `Idempotency-Key` header set to the trigger id so that the provider can
    drop a repeat. Any 2xx is delivered; anything else, or no answer, fails.
    """

    def __init__(
        self,
        channel: Channel,
        url: str,
        *,
        client: httpx.Client | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if channel not in ("sms", "push"):
            msg = f"HttpProvider is for sms or push, not {channel}"
            raise ConfigError(msg)
        self._channel: Channel = channel
        self._url = url
        self._client = client if client is not None else httpx.Client(timeout=timeout_s)
        self._owns_client = client is None

    @property
    def channel(self) -> Channel:
        return self._channel

    def send(self, message: Message, contact: Contact, *, trigger_id: str) -> None:
        to = contact.phone if self._channel == "sms" else contact.push_token
        if not to:
            what = "phone number" if self._channel == "sms" else "push token"
            raise DeliveryError(self._channel, f"no {what} for user {contact.user_id}")
        payload: dict[str, str] = {
            "channel": self._channel,
            "to": to,
            "body": message.body,
            "trigger_id": trigger_id,
        }
        if message.subject is not None:
            payload["title"] = message.subject
        try:
            response = self._client.post(
                self._url, json=payload, headers={"Idempotency-Key": trigger_id}
            )
        except httpx.HTTPError as exc:
            text = str(exc)
            reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            raise DeliveryError(self._channel, f"provider {self._url}: {reason}") from None
        if not 200 <= response.status_code < 300:
            detail = response.text[:_ERROR_TEXT_LIMIT]
            reason = f"provider answered HTTP {response.status_code}"
            raise DeliveryError(self._channel, f"{reason}: {detail}" if detail else reason)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


# --- contacts ------------------------------------------------------------------------------


class ContactDirectory(Protocol):
    """Looks up how to reach a user; may raise (a Redis outage) and is then asked again."""

    def contact(self, user_id: str) -> Contact: ...


class NoContacts:
    """Knows nobody: only a dispatch body's own `contact` object reaches anyone."""

    def contact(self, user_id: str) -> Contact:
        return Contact(user_id)


class StaticContacts:
    """Contacts known up front (tests, demos)."""

    def __init__(self, contacts: Mapping[str, Contact]) -> None:
        self._contacts = dict(contacts)

    def contact(self, user_id: str) -> Contact:
        return self._contacts.get(user_id, Contact(user_id))


class RedisContacts:
    """The profile hash `profile:<user_id>` (`email`, `phone`, `push_token`, `name`)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def contact(self, user_id: str) -> Contact:
        raw: Mapping[bytes | str, bytes | str] = self._client.hgetall(PROFILE_KEY.format(user_id))
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode() if isinstance(v, bytes) else v
            )
            for k, v in raw.items()
        }
        return Contact(user_id).merged(fields)


def parse_host_port(text: str, *, what: str = "address") -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) → (host, port); `ConfigError` when it is not one."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        msg = f"bad {what} {text!r}: write HOST:PORT, e.g. 127.0.0.1:1025"
        raise ConfigError(msg)
    return host, int(port_text)
