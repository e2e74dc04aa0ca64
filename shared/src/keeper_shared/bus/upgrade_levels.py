"""Which release each receiver reads, so a sender never sends it a version it cannot decode.

During a rolling upgrade releases N and N-1 run side by side. A receiver dead-letters a
schema version newer than it knows, so every sender caps what it sends:

- events (several consumers) and commands to policy or the store: the configured
  ``KEEPER_UPGRADE_LEVEL`` (the oldest release still running among them; by default this
  build's own), as Nova pins its RPC versions with ``[upgrade_levels]``;
- commands to a host: the release the host advertises in its heartbeats, once this process
  has heard one; the configured level until then;
- replies: the release the caller names in its command's ``x-keeper-release`` header; a
  command without it comes from 0.1.0, which predates the header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from keeper_shared.messages.releases import (
    CURRENT_RELEASE,
    OLDEST_RELEASE,
    RELEASE_PATTERN,
    UnknownReleaseError,
    UpgradeLevel,
    upgrade_level,
)

RELEASE_HEADER = "x-keeper-release"
"""The release of the process that sent a message (what it reads); replies are capped at it."""

log = structlog.get_logger(__name__)


class UpgradeSettings(BaseSettings):
    """The configured cap, one variable for every service and the CLI."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_", frozen=True, extra="ignore")

    upgrade_level: str = Field(
        default=CURRENT_RELEASE,
        pattern=RELEASE_PATTERN,
        description="The oldest release still running among this process's receivers: "
        "every message is sent at the versions that release reads. Set it to the previous "
        "release while a fleet is upgraded; clear it once every service and host runs this "
        "one (docs/upgrades.md).",
    )


def configured_level() -> UpgradeLevel:
    """The level ``KEEPER_UPGRADE_LEVEL`` names; raises UnknownReleaseError for a release
    this build cannot talk to (a start-up error, before anything is sent)."""
    return upgrade_level(UpgradeSettings().upgrade_level)


class ReceiverLevels:
    """The level to send each message at (see the module docstring)."""

    def __init__(self, configured: UpgradeLevel) -> None:
        self.configured = configured
        self._by_target: dict[str, UpgradeLevel] = {}

    def learn(self, target: str, release: str) -> None:
        """Remember that the consumer of the command queue ``target`` runs ``release``
        (from a heartbeat its host's own broker user sent). A release this build cannot
        talk to leaves the configured level in place."""
        try:
            level = upgrade_level(release)
        except UnknownReleaseError as error:
            log.warning("receiver's release ignored", target=target, reason=str(error))
            return
        previous = self._by_target.get(target)
        self._by_target[target] = level
        if previous is None or previous.release != level.release:
            log.info("receiver's release learnt", target=target, release=level.release)

    def for_target(self, target: str) -> UpgradeLevel:
        """The level of a command to ``target``."""
        return self._by_target.get(target, self.configured)

    @staticmethod
    def for_reply(caller_release: str | None) -> UpgradeLevel:
        """The level of a reply to a caller that named ``caller_release`` in its command
        (None: it named none, so it runs 0.1.0, or sent something this build cannot
        read as a release; the oldest level is safe for both)."""
        if caller_release is None:
            return upgrade_level(OLDEST_RELEASE)
        try:
            return upgrade_level(caller_release)
        except UnknownReleaseError:
            return upgrade_level(OLDEST_RELEASE)


def sender_release(headers: Mapping[str, Any] | None) -> str | None:
    """The release a message's sender named in its headers, None when it named none."""
    named = (headers or {}).get(RELEASE_HEADER)
    if isinstance(named, bytes):
        named = named.decode("ascii", errors="replace")
    return named if isinstance(named, str) else None
