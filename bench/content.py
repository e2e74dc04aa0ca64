"""Realistic state contents: a TPM manufactured by swtpm_setup (as libvirt does on a VM's
first start) and the OVMF VARS template, each with variants that differ in a few bytes."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.hosts import nvram_template
from keeper_devtools.swtpm_lab import (
    manufacture_tpm_state,
    permall_framing,
    write_private_ca_config,
)
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.state_format.blobs import seal_blob
from keeper_shared.state_format.tpm_archive import (
    MAIN_STATE_FILE_NAME,
    pack_tpm_state,
    read_tpm_state_dir,
)
from keeper_state_store.identity.fingerprint import archive_identity

_PERMALL_HEAD = 32
"""swtpm's header, its record header and libtpms' header, with room to spare."""
_PERMALL_TAIL = 4
"""libtpms' closing magic."""


@dataclass(frozen=True)
class RealContent:
    """A real swtpm permall, and its canonical archive."""

    permall: bytes
    manufactured: bool


async def real_tpm_state(work: Path) -> RealContent:
    """A freshly manufactured swtpm TPM 2 state (random 6 KB if swtpm_setup is missing)."""
    try:
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            config = write_private_ca_config(Path(scratch) / "ca")
            state_dir = Path(scratch) / "tpm2"
            await manufacture_tpm_state(state_dir, config=config)
            files = read_tpm_state_dir(state_dir)
            return RealContent(files[MAIN_STATE_FILE_NAME], True)
    except Exception:  # no swtpm here: fall back, and say so in the report
        return RealContent(permall_framing(random.Random(1).randbytes(6 * 1024)), False)


def variants(kind: StateKind, base: bytes, count: int, seed: int) -> list[StateBlob]:
    """``count`` sealed blobs of ``base`` with a few bytes changed, as a TPM or the firmware
    changes them (16 bytes for a TPM, one 64-byte variable write for the NVRAM). A TPM
    changes inside its state, never in swtpm's and libtpms' headers or closing magic (a
    host refuses a permall whose framing is broken), and stays the same TPM: a change that
    hit its endorsement seed would be a TPM replaced unasked, which the store flags and
    announces, work a real boot never causes."""
    rng = random.Random(seed)
    own = _identity(kind, base)
    blobs: list[StateBlob] = []
    while len(blobs) < count:
        content = bytearray(base)
        width = 16 if kind is StateKind.TPM else 64
        head, tail = (_PERMALL_HEAD, _PERMALL_TAIL) if kind is StateKind.TPM else (0, 0)
        offset = rng.randrange(head, len(content) - width - tail)
        content[offset : offset + width] = rng.randbytes(width)
        if _identity(kind, bytes(content)) != own:
            continue
        canonical = (
            pack_tpm_state({MAIN_STATE_FILE_NAME: bytes(content)})
            if kind is StateKind.TPM
            else bytes(content)
        )
        blobs.append(seal_blob(kind, canonical, FencingToken(epoch=1, generation=1)))
    return blobs


def _identity(kind: StateKind, content: bytes) -> str | None:
    """The TPM's identity as the store reads it (None for NVRAM, or when not readable)."""
    if kind is not StateKind.TPM:
        return None
    return archive_identity(pack_tpm_state({MAIN_STATE_FILE_NAME: content})).fingerprint


def nvram_base() -> bytes:
    """The OVMF VARS template a VM's NVRAM starts from."""
    return nvram_template()
