"""Whether swtpm could load a ``tpm2-00.permall`` at all, checked before the host writes one
(a prepare must never replace a loadable TPM with one swtpm refuses). Pure: no I/O.

Only what swtpm and libtpms themselves check on load, and what their code fixes, is checked:

- swtpm (``src/swtpm/swtpm_nvstore.c``, ``SWTPM_NVRAM_CheckHeader``) refuses a state file
  that does not start with its 10-byte header (big-endian: version u8, min_version u8,
  hdrsize u16, flags u16, totlen u32) whose ``hdrsize`` is 10 and whose ``totlen`` is the
  file's length. That one comparison catches a 0-byte, truncated or extended file.
- Under a version 2 header the state is tag-length-value records (``src/swtpm/tlv.h``:
  tag u16, length u32), the plain TPM state under ``TAG_DATA`` (1); under version 1 it
  follows the header directly. Encrypted state (header flags 0x01 or 0x02, or encrypted
  records) is opaque here: only swtpm with the key can judge it.
- libtpms (``src/tpm2/NVMarshal.c``, ``PERSISTENT_ALL_Marshal``) starts the plain TPM 2
  state with version u16 and magic u32 ``0xab364723`` and ends it with the same magic.

Size: libtpms marshals at most its NV memory (``NV_MEMORY_SIZE``, 128 KiB + 65 * 704 bytes
= 172.7 KiB in ``TpmProfile_Misc.h``) plus small headers, so a permall beyond 256 KiB is
not one libtpms wrote. A freshly manufactured one is 1.3 KB (no EK certificate) to 5 KB
(EK and platform certificates) with swtpm 0.7.
"""

from __future__ import annotations

import struct

from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME

SWTPM_HEADER = struct.Struct(">BBHHI")
"""swtpm's state header: version, min_version, hdrsize, flags, totlen (header included)."""

SWTPM_FLAGS_ENCRYPTED = 0x01 | 0x02
"""``BLOB_FLAG_ENCRYPTED`` (state key) and ``BLOB_FLAG_MIGRATION_ENCRYPTED``."""

TLV_HEADER = struct.Struct(">HI")
"""swtpm's tag-length-value record header: tag, length of the data that follows."""

TAG_DATA = 1
"""The record holding the plain TPM state."""

ENCRYPTED_TAGS = frozenset({2, 5, 6, 7})
"""``TAG_ENCRYPTED_DATA``, ``TAG_ENCRYPTED_MIGRATION_DATA`` and their IV-carrying forms."""

LIBTPMS_HEADER = struct.Struct(">HI")
"""libtpms' ``NV_HEADER`` as the permanent state starts: version, magic."""

PERSISTENT_ALL_MAGIC = 0xAB364723
"""libtpms' magic at both ends of a TPM 2 permanent state."""

MAX_PERMALL_SIZE = 256 * 1024
"""Above libtpms' NV memory plus its headers: no libtpms writes a larger permall."""

_NAME = MAIN_STATE_FILE_NAME


class ImplausiblePermallError(ValueError):
    """A permall swtpm could not load: empty, truncated, not swtpm's or not libtpms'."""


def check_permall(data: bytes, *, max_size: int = MAX_PERMALL_SIZE) -> None:
    """Raise `ImplausiblePermallError` saying why swtpm could not load ``data``."""
    size = len(data)
    if size == 0:
        raise ImplausiblePermallError(f"{_NAME} is empty (0 bytes): swtpm cannot load it")
    if size > max_size:
        raise ImplausiblePermallError(
            f"{_NAME} is {size} bytes, more than the {max_size} a TPM 2 permanent state can be"
        )
    if size < SWTPM_HEADER.size:
        raise ImplausiblePermallError(
            f"{_NAME} is {size} bytes, shorter than swtpm's {SWTPM_HEADER.size}-byte state "
            "header: truncated"
        )
    version, _min_version, header_size, flags, total = SWTPM_HEADER.unpack_from(data)
    if header_size != SWTPM_HEADER.size:
        raise ImplausiblePermallError(
            f"{_NAME} does not start with swtpm's state header (header size {header_size}, "
            f"not {SWTPM_HEADER.size})"
        )
    if total != size:
        raise ImplausiblePermallError(
            f"{_NAME} is {size} bytes but its swtpm header says {total}: "
            + ("truncated" if size < total else "bytes were added after it")
        )
    if flags & SWTPM_FLAGS_ENCRYPTED:
        return
    body = data[SWTPM_HEADER.size :]
    if version == 1:
        _check_libtpms_state(body)
    elif version == 2:
        plain = _plain_record(body)
        if plain is not None:
            _check_libtpms_state(plain)
    # A later header version lays out its body in a way this check does not know.


def _plain_record(body: bytes) -> bytes | None:
    """The ``TAG_DATA`` record's data; None when the state is held encrypted instead."""
    offset = 0
    tags: set[int] = set()
    while offset < len(body):
        if offset + TLV_HEADER.size > len(body):
            raise ImplausiblePermallError(
                f"{_NAME} ends inside a record header at byte {SWTPM_HEADER.size + offset}: "
                "truncated"
            )
        tag, length = TLV_HEADER.unpack_from(body, offset)
        start = offset + TLV_HEADER.size
        if start + length > len(body):
            raise ImplausiblePermallError(
                f"{_NAME} record {tag} declares {length} bytes but only "
                f"{len(body) - start} follow: truncated"
            )
        if tag == TAG_DATA:
            return body[start : start + length]
        tags.add(tag)
        offset = start + length
    if tags & ENCRYPTED_TAGS:
        return None
    raise ImplausiblePermallError(f"{_NAME} holds no TPM state record (swtpm tag {TAG_DATA})")


def _check_libtpms_state(state: bytes) -> None:
    if len(state) < LIBTPMS_HEADER.size + 4:
        raise ImplausiblePermallError(
            f"{_NAME} holds {len(state)} bytes of TPM state, too few for libtpms' header: truncated"
        )
    _version, magic = LIBTPMS_HEADER.unpack_from(state)
    if magic != PERSISTENT_ALL_MAGIC:
        raise ImplausiblePermallError(
            f"{_NAME}'s TPM state does not start with libtpms' permanent-state magic "
            f"{PERSISTENT_ALL_MAGIC:#010x} (found {magic:#010x})"
        )
    (trailer,) = struct.unpack_from(">I", state, len(state) - 4)
    if trailer != PERSISTENT_ALL_MAGIC:
        raise ImplausiblePermallError(
            f"{_NAME}'s TPM state does not end with libtpms' permanent-state magic: truncated"
        )
