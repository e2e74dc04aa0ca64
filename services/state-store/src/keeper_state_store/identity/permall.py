"""Reading the endorsement primary seed out of a ``tpm2-00.permall``. Pure: no I/O.

The seed (EPS) is what a TPM's endorsement keys derive from: the same seed gives the same
EK, a TPM manufactured anew gets a new random one, and nothing but TPM2_ChangeEPS (which
no guest can run: it needs platform authorization) replaces it. So comparing seeds tells
"same TPM" from "new TPM" exactly, without starting swtpm.

Two layers, both read as their writers write them (learned from their sources, written
anew here):

- swtpm's blob (``src/swtpm/swtpm_nvstore.c``): a 10-byte big-endian header (version u8,
  min_version u8, hdrsize u16, flags u16, totlen u32); under version 1 the libtpms state
  follows it, under version 2 tag-length-value records (tag u16, length u32) hold it,
  plain under tag 1, or encrypted (flags 0x01; tags 2 data, 3 HMAC, 6 IV) with a key
  derived from the libvirt secret (see `keeper_state_store.identity.swtpm_encryption`).
- libtpms' permanent state (``src/tpm2/NVMarshal.c``, ``PERSISTENT_ALL_Marshal``), the
  same from libtpms 0.7 to 0.10: a header (version u16, magic u32 0xab364723, and from
  version 2 min_version u16); from version 4 the profile as a u16-length string; the
  compile-time constants block (header with magic 0xc9ea6431, u32 count, that many u32,
  and from version 2 a skippable block: u8 present, u16 size, its bytes); then
  PERSISTENT_DATA (header with magic 0x12213443; u8 disableClear; three u16 algorithm ids;
  six TPM2B fields: owner/endorsement/lockout policies and auths, each u16 size and its
  bytes), and next the EPSeed as a TPM2B.

Every read is bounds-checked; anything that does not fit the layout is a
`PermallFormatError`, never a guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

SWTPM_HEADER: Final = struct.Struct(">BBHHI")
TLV_HEADER: Final = struct.Struct(">HI")

FLAG_ENCRYPTED: Final = 0x01
FLAG_MIGRATION_ENCRYPTED: Final = 0x02
FLAG_ENCRYPTED_256BIT_KEY: Final = 0x08

TAG_DATA: Final = 1
TAG_ENCRYPTED_DATA: Final = 2
TAG_HMAC: Final = 3
TAG_IVEC_ENCRYPTED_DATA: Final = 6

PERSISTENT_ALL_MAGIC: Final = 0xAB364723
PA_COMPILE_CONSTANTS_MAGIC: Final = 0xC9EA6431
PERSISTENT_DATA_MAGIC: Final = 0x12213443

MAX_SEED_SIZE: Final = 64
"""libtpms' PRIMARY_SEED_SIZE is 32 (SHA-256 sized) or 64; a larger one is not libtpms'."""

_TPM2B_BEFORE_SEED: Final = 6
"""ownerPolicy, endorsementPolicy, lockoutPolicy, ownerAuth, endorsementAuth, lockoutAuth."""


class PermallFormatError(ValueError):
    """The bytes are not a permall laid out as swtpm and libtpms write one (the text says
    where, never with state bytes)."""


class PermallEncryptedError(PermallFormatError):
    """The state is encrypted; its key is needed to read it."""


@dataclass(frozen=True)
class SwtpmBlob:
    """A permall's swtpm framing, taken apart."""

    version: int
    flags: int
    records: dict[int, bytes]
    """Version 2: data of each tag; version 1: the whole body under `TAG_DATA`."""

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & (FLAG_ENCRYPTED | FLAG_MIGRATION_ENCRYPTED)) or (
            TAG_DATA not in self.records and TAG_ENCRYPTED_DATA in self.records
        )


def read_swtpm_blob(data: bytes) -> SwtpmBlob:
    """Take swtpm's framing apart (header checked as swtpm checks it on load)."""
    if len(data) < SWTPM_HEADER.size:
        raise PermallFormatError(f"{len(data)} bytes: shorter than swtpm's header")
    version, _min_version, header_size, flags, total = SWTPM_HEADER.unpack_from(data)
    if header_size != SWTPM_HEADER.size or total != len(data):
        raise PermallFormatError("swtpm's header does not describe these bytes")
    body = data[SWTPM_HEADER.size :]
    if version == 1:
        return SwtpmBlob(version, flags, {TAG_DATA: body})
    if version != 2:
        raise PermallFormatError(f"swtpm header version {version} is not known here")
    records: dict[int, bytes] = {}
    offset = 0
    while offset < len(body):
        if offset + TLV_HEADER.size > len(body):
            raise PermallFormatError("swtpm record header truncated")
        tag, length = TLV_HEADER.unpack_from(body, offset)
        start = offset + TLV_HEADER.size
        if start + length > len(body):
            raise PermallFormatError(f"swtpm record {tag} truncated")
        records.setdefault(tag, body[start : start + length])
        offset = start + length
    return SwtpmBlob(version, flags, records)


def plain_state(blob: SwtpmBlob) -> bytes:
    """The libtpms state of an unencrypted blob."""
    if blob.encrypted:
        raise PermallEncryptedError("the TPM state is encrypted")
    state = blob.records.get(TAG_DATA)
    if state is None:
        raise PermallFormatError("no plain TPM state record in the permall")
    return state


class _Reader:
    """Big-endian reads over libtpms' marshalled state; an overrun is a format error."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def take(self, count: int, what: str) -> bytes:
        end = self._offset + count
        if count < 0 or end > len(self._data):
            raise PermallFormatError(f"libtpms state truncated in {what}")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what))

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what))

    def sized(self, what: str) -> bytes:
        """A TPM2B (or libtpms string): u16 size, then that many bytes."""
        return self.take(self.u16(what), what)

    def header(self, magic: int, what: str) -> int:
        """libtpms' NV_HEADER; its version."""
        version = self.u16(what)
        found = self.u32(what)
        if found != magic:
            raise PermallFormatError(f"{what} magic is {found:#010x}, expected {magic:#010x}")
        if version >= 2:
            self.u16(what)  # min_version: what a reader must support, not layout
        return version

    def skippable_block(self, what: str) -> None:
        """A block later libtpms versions append to: u8 present, u16 size, bytes."""
        present = self.u8(what)
        size = self.u16(what)
        if present:
            self.take(size, what)


def profile_text(state: bytes) -> str | None:
    """The profile a libtpms TPM 2 permanent state carries (libtpms' JSON, as written), or
    None when it carries none (a state libtpms 0.9 or older wrote: ``PERSISTENT_ALL``
    before version 4)."""
    reader = _Reader(state)
    if reader.header(PERSISTENT_ALL_MAGIC, "PERSISTENT_ALL") < 4:
        return None
    raw = reader.sized("the profile")
    # libtpms writes the string with its terminating NUL, counted in the size.
    try:
        return raw.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise PermallFormatError("the profile is not UTF-8") from None


def endorsement_seed(state: bytes) -> bytes:
    """The EPSeed of a libtpms TPM 2 permanent state (``PERSISTENT_ALL``)."""
    reader = _Reader(state)
    version = reader.header(PERSISTENT_ALL_MAGIC, "PERSISTENT_ALL")
    if version >= 4:
        reader.sized("the profile")
    constants_version = reader.header(PA_COMPILE_CONSTANTS_MAGIC, "compile-time constants")
    count = reader.u32("compile-time constants")
    reader.take(4 * count, "compile-time constants")
    if constants_version >= 2:
        reader.skippable_block("compile-time constants")
    reader.header(PERSISTENT_DATA_MAGIC, "PERSISTENT_DATA")
    reader.u8("disableClear")
    for _ in range(3):
        reader.u16("hierarchy algorithms")
    for _ in range(_TPM2B_BEFORE_SEED):
        reader.sized("hierarchy policies and auths")
    seed = reader.sized("EPSeed")
    if not 0 < len(seed) <= MAX_SEED_SIZE:
        raise PermallFormatError(f"EPSeed of {len(seed)} bytes is not a libtpms seed")
    if not any(seed):
        raise PermallFormatError("EPSeed is all zeros: not a manufactured TPM")
    return seed
