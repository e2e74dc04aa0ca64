"""The key-encryption keys one store replica holds: the current one and previous ones.

A wrapped data key names the KEK that wrapped it (`WrappedKey.kek_id`), so a replica that
holds several KEKs opens any record with the right one, and new data keys are always
wrapped with the current KEK. That is what lets a KEK rotation run without downtime:

1. give every replica the new KEK as a *previous* key (all replicas can now open records
   wrapped by either key, none writes with the new one yet);
2. make the new KEK current and the old one previous on every replica; records are
   rewrapped (see ``keeper_state_store.crypto.key_rotation``) while every replica still reads both;
3. once no record names the old KEK any more, drop it from the configuration.

Nothing here puts key bytes into a repr or an error text (invariant 4): keys are named by
their public 8-hex-char id only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from keeper_state_store.crypto.encryption import (
    DataKey,
    DecryptionError,
    KeyEncryptionKey,
    WrappedKey,
    load_key_encryption_key,
    unwrap_data_key,
    wrap_data_key,
)


class UnknownKeyError(DecryptionError):
    """A wrapped data key names a KEK this key ring does not hold."""


class KeyRing:
    """The current KEK, which wraps, and previous KEKs, which only unwrap."""

    __slots__ = ("_by_id", "_current")

    def __init__(
        self, current: KeyEncryptionKey, previous: Iterable[KeyEncryptionKey] = ()
    ) -> None:
        """Hold ``current`` and ``previous``; a previous key equal to another is dropped.

        Raises `ValueError` if two different keys share an id (a 32-bit id collision: the
        ring could not tell which one wrapped a record).
        """
        self._current = current
        self._by_id: dict[str, KeyEncryptionKey] = {current.key_id: current}
        for key in previous:
            known = self._by_id.get(key.key_id)
            if known is None:
                self._by_id[key.key_id] = key
            elif known != key:
                msg = f"two different key-encryption keys share the id {key.key_id}"
                raise ValueError(msg)

    @classmethod
    def from_files(cls, current: Path, previous: Sequence[Path] = ()) -> KeyRing:
        """Load the current KEK file and the previous KEK files (see
        `load_key_encryption_key` for the checks each file must pass)."""
        return cls(
            load_key_encryption_key(current),
            [load_key_encryption_key(path) for path in previous],
        )

    @property
    def current(self) -> KeyEncryptionKey:
        """The KEK new data keys are wrapped with."""
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every KEK held, the current one first."""
        return tuple(self._by_id)

    def knows(self, kek_id: str) -> bool:
        """True when the ring holds the KEK with this id."""
        return kek_id in self._by_id

    def is_current(self, wrapped: WrappedKey) -> bool:
        """True when ``wrapped`` is wrapped by the current KEK (nothing to rotate)."""
        return wrapped.kek_id == self._current.key_id

    def wrap(self, dek: DataKey) -> WrappedKey:
        """Wrap ``dek`` with the current KEK."""
        return wrap_data_key(self._current, dek)

    def unwrap(self, wrapped: WrappedKey) -> DataKey:
        """Unwrap with the KEK the record names.

        Raises `UnknownKeyError` when the ring does not hold that KEK, and
        `DecryptionError` when the record fails its integrity check under it.
        """
        kek = self._by_id.get(wrapped.kek_id)
        if kek is None:
            msg = (
                f"data key was wrapped by KEK {wrapped.kek_id}, which this key ring does not "
                f"hold (it holds {', '.join(self._by_id)})"
            )
            raise UnknownKeyError(msg)
        return unwrap_data_key(kek, wrapped)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        """The same data key wrapped by the current KEK (unchanged if it already is).

        AES key wrap is deterministic, so two replicas rewrapping one record produce the
        same bytes.
        """
        if self.is_current(wrapped):
            return wrapped
        return self.wrap(self.unwrap(wrapped))

    def __repr__(self) -> str:
        return f"KeyRing(current={self._current.key_id!r}, key_ids={list(self._by_id)!r})"
