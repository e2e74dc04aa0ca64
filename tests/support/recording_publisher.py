"""A stand-in for ``BusClient.publish_event`` that keeps what the code under test published,
for tests that run a component in process without a broker."""

from __future__ import annotations

from typing import TypeVar

from keeper_shared.messages.envelope import Payload

P = TypeVar("P", bound=Payload)


class RecordingPublisher:
    """Keeps every event published through it, with its subject, in order. Pass the object
    where a `BusClient` only publishes events, or its ``publish_event`` where a publish
    callable is expected."""

    def __init__(self) -> None:
        self.events: list[tuple[Payload, str]] = []

    async def publish_event(self, payload: Payload, *, subject: str) -> None:
        """Keep ``payload`` and the ``subject`` it was published about."""
        self.events.append((payload, subject))

    def of_type(self, kind: type[P]) -> list[P]:
        """The events of type ``kind`` published so far, oldest first."""
        return [payload for payload, _subject in self.events if isinstance(payload, kind)]
