"""Releases and what each reads: the schema version of every message type (its manifest).

A sender that may be talking to an older release (during a rolling upgrade) sends every
message at the version the receiver's release reads, downcast when needed (see
:func:`keeper_shared.messages.envelope.encode`). The current release's manifest is read from
the payload classes themselves; an older release's is frozen here when it is tagged, and a
test proves it equals what the tagged code declares (``tests/unit/shared/messages``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType

from keeper_shared.messages.envelope import NotExpressibleError, Payload

CURRENT_RELEASE = "0.2.0"
"""This build's release (every package's ``version``); bump both together."""

RELEASE_PATTERN = r"^\d{1,4}\.\d{1,4}\.\d{1,4}$"
"""A release as the keeper names it: ``MAJOR.MINOR.PATCH``."""

Manifest = Mapping[str, int]
"""Message type -> the schema version a release reads (and writes)."""

FROZEN_MANIFESTS: Mapping[str, Manifest] = MappingProxyType(
    {
        # Tag v0.1.0 (b22ef20); releases before it did not exist.
        "0.1.0": MappingProxyType(
            {
                "command.rejected": 1,
                "host.heartbeat": 4,
                "host.lost": 1,
                "host.returned": 1,
                "hosts.list": 1,
                "hosts.listed": 1,
                "snapshot.create": 1,
                "snapshot.create.reply": 1,
                "snapshot.delete": 1,
                "snapshot.delete.reply": 1,
                "snapshot.list": 1,
                "snapshot.listed": 1,
                "state.changed": 2,
                "state.delete": 1,
                "state.delete.reply": 1,
                "state.deleted": 1,
                "state.describe": 1,
                "state.described": 1,
                "state.ek.read": 1,
                "state.ek.read-result": 1,
                "state.export": 2,
                "state.exported": 1,
                "state.fetch": 1,
                "state.fetched": 3,
                "state.history": 1,
                "state.history-listed": 1,
                "state.import": 2,
                "state.import.reply": 1,
                "state.loss.recorded": 2,
                "state.newest": 2,
                "state.newest.read": 2,
                "state.persisted": 2,
                "state.refused": 1,
                "state.restore": 2,
                "state.restore.reply": 1,
                "state.retrieve": 1,
                "state.retrieve.reply": 1,
                "state.scrub.failed": 1,
                "state.tpm.accept": 1,
                "state.tpm.accept.reply": 1,
                "state.tpm.reset": 2,
                "state.tpm.reset.cleared": 1,
                "template.create": 1,
                "template.created": 1,
                "template.delete": 1,
                "template.delete.reply": 1,
                "templates.list": 1,
                "templates.listed": 1,
                "tpm.approved": 1,
                "tpm.disable": 1,
                "tpm.disable.reply": 1,
                "tpm.disabled": 1,
                "tpm.enable": 3,
                "tpm.enable.reply": 1,
                "tpm.rejected": 1,
                "tpm.state.stranded": 1,
                "vm.adopt": 1,
                "vm.adopted": 1,
                "vm.adoption-result": 1,
                "vm.claim": 1,
                "vm.claimed": 1,
                "vm.clone": 1,
                "vm.clone.reply": 1,
                "vm.create-from-template": 1,
                "vm.create-from-template.reply": 1,
                "vm.defined": 1,
                "vm.discovered": 1,
                "vm.evicted": 1,
                "vm.migrated": 1,
                "vm.place": 2,
                "vm.place.reply": 1,
                "vm.placed": 1,
                "vm.poweroff": 1,
                "vm.poweroff.reply": 1,
                "vm.prepare": 3,
                "vm.prepare.reply": 1,
                "vm.resume": 1,
                "vm.resume.reply": 1,
                "vm.resumed": 1,
                "vm.retired": 1,
                "vm.revert": 1,
                "vm.revert-domain": 1,
                "vm.revert-domain.reply": 1,
                "vm.revert.reply": 1,
                "vm.set-epoch": 1,
                "vm.set-epoch.reply": 1,
                "vm.shutdown": 1,
                "vm.shutdown.reply": 1,
                "vm.snapshot": 1,
                "vm.snapshot-domain": 1,
                "vm.snapshot-domain-delete": 1,
                "vm.snapshot-domain-delete.reply": 1,
                "vm.snapshot-domain.reply": 1,
                "vm.snapshot.reply": 1,
                "vm.snapshotted": 1,
                "vm.start": 1,
                "vm.start.reply": 1,
                "vm.started": 1,
                "vm.stop": 1,
                "vm.stop.reply": 1,
                "vm.stopped": 1,
                "vm.suspend": 1,
                "vm.suspend.reply": 1,
                "vm.suspended": 1,
                "vm.undefine": 1,
                "vm.undefine.reply": 1,
                "vm.undefined": 1,
                "vms.list": 1,
                "vms.listed": 1,
                "vms.unprotected.list": 1,
                "vms.unprotected.listed": 1,
            }
        ),
    }
)
"""The manifests of earlier releases, frozen when they were tagged. Never edited after: a
receiver of that release reads exactly these versions."""


class UnknownReleaseError(ValueError):
    """A release this build cannot name a manifest for (malformed, or older than N-1)."""


def release_number(release: str) -> tuple[int, ...]:
    """``"0.10.2"`` -> ``(0, 10, 2)``, for ordering; raise UnknownReleaseError if malformed."""
    if re.fullmatch(RELEASE_PATTERN, release) is None:
        raise UnknownReleaseError(f"{release[:32]!r} is not a release (MAJOR.MINOR.PATCH)")
    return tuple(int(part) for part in release.split("."))


OLDEST_RELEASE = min(FROZEN_MANIFESTS, key=release_number)
"""The oldest release this build can still talk to (N-1)."""


def _payload_classes(base: type[Payload]) -> Iterator[type[Payload]]:
    for subclass in base.__subclasses__():
        yield subclass
        yield from _payload_classes(subclass)


@cache
def current_manifest() -> Manifest:
    """What this build reads: every concrete payload class of ``keeper_shared.messages``
    (all its modules imported first), by message type."""
    package = importlib.import_module("keeper_shared.messages")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"keeper_shared.messages.{module.name}")
    manifest: dict[str, int] = {}
    for payload_class in _payload_classes(Payload):
        message_type = payload_class.__dict__.get("message_type")
        # Only the shipped messages: a test's own payload classes are no part of a release.
        if message_type is not None and payload_class.__module__.startswith(package.__name__):
            manifest[message_type] = payload_class.schema_version
    return MappingProxyType(manifest)


@dataclass(frozen=True)
class UpgradeLevel:
    """The release a receiver runs, and so the version of each message it reads."""

    release: str
    manifest: Manifest

    def version_for(self, message_type: str) -> int:
        """The version of ``message_type`` to send at this level; raise NotExpressibleError
        when the release does not read that type at all (it came later)."""
        version = self.manifest.get(message_type)
        if version is None:
            raise NotExpressibleError(
                f"{message_type} cannot be sent to release {self.release}: it does not read "
                "that message type"
            )
        return version

    @property
    def is_current(self) -> bool:
        """Whether this level is this build's own (nothing is ever downcast)."""
        return self.release == CURRENT_RELEASE


def upgrade_level(release: str) -> UpgradeLevel:
    """The level of a receiver running ``release``. A release newer than this build reads
    all it writes (it upcasts); an older one reads the manifest frozen for the newest
    known release not after it; one older than every frozen release is unknown."""
    number = release_number(release)
    if number >= release_number(CURRENT_RELEASE):
        return UpgradeLevel(CURRENT_RELEASE, current_manifest())
    known = [name for name in FROZEN_MANIFESTS if release_number(name) <= number]
    if not known:
        raise UnknownReleaseError(
            f"release {release} is older than {OLDEST_RELEASE}, the oldest this build "
            f"({CURRENT_RELEASE}) can talk to; upgrade it to {OLDEST_RELEASE} first"
        )
    newest = max(known, key=release_number)
    return UpgradeLevel(newest, FROZEN_MANIFESTS[newest])
