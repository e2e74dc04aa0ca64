"""The verification record the scrubber keeps per stored version.

Stored as JSON in the hash ``state_flags_key(vm_id, kind)``, field = version number::

    {"scrubbed_at": "2024-05-01T12:00:00+00:00",  # when it was last verified (UTC)
     "ok": true,                  # decrypted, decompressed, hash matched (and, for a TPM,
                                  # it unpacked and a throwaway swtpm loaded it if run)
     "reason": null,              # why not ok, or what is notable (EK change); no bytes
     "content_hash": "9f86...",   # the hash the version was verified against
     "ek_sha256": "ab12..." | null,  # sha256 of the TPM's EK public area (0x81010001);
                                     # null for NVRAM, without swtpm, or without an EK
     "swtpm_loaded": true,        # a throwaway swtpm started on it (TPM only)
     "ek_changed": false,         # the EK differs from the previous good version's
     "previous_good_version": null | 3}  # with ek_changed: the version to restore

Readers (the history command) should use `ScrubFlag.from_json` and treat a missing
field as its default, so the record can grow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ScrubFlag:
    """What the scrubber found for one stored version."""

    scrubbed_at: datetime
    ok: bool
    reason: str | None = None
    content_hash: str | None = None
    ek_sha256: str | None = None
    swtpm_loaded: bool = False
    ek_changed: bool = False
    previous_good_version: int | None = None

    def to_json(self) -> str:
        """Serialise for the flags hash."""
        record: dict[str, Any] = asdict(self)
        record["scrubbed_at"] = self.scrubbed_at.isoformat()
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ScrubFlag | None:
        """Parse a flags-hash value; None when it is not a record this code understands."""
        try:
            record = json.loads(raw)
            previous = record.get("previous_good_version")
            return cls(
                scrubbed_at=datetime.fromisoformat(record["scrubbed_at"]),
                ok=bool(record["ok"]),
                reason=_optional_str(record.get("reason")),
                content_hash=_optional_str(record.get("content_hash")),
                ek_sha256=_optional_str(record.get("ek_sha256")),
                swtpm_loaded=bool(record.get("swtpm_loaded", False)),
                ek_changed=bool(record.get("ek_changed", False)),
                previous_good_version=int(previous) if previous is not None else None,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _optional_str(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value
