"""The identity the store records for each TPM version it persists.

A fingerprint is the sha256 of a fixed label and the endorsement primary seed (see
`keeper_state_store.identity.permall`): equal fingerprints mean the same seed, so the
same endorsement key; the seed itself (32 or 64 random bytes) never leaves this function
and cannot be recovered from the fingerprint. Reading it costs microseconds, so the store
judges every version when it persists it, not minutes later like the scrubber's swtpm.

When the identity cannot be read the answer is "unknown", with why, and never a guess:
content that is not a libtpms TPM 2 state, or a state encrypted with a secret the store
does not hold (or that does not open it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from keeper_shared.libtpms import StateProfile
from keeper_shared.state_format.compression import BlobFormatError
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, unpack_tpm_state
from keeper_state_store.identity.permall import (
    PermallFormatError,
    endorsement_seed,
    plain_state,
    read_swtpm_blob,
)
from keeper_state_store.identity.profile import state_profile
from keeper_state_store.identity.swtpm_encryption import decrypt_state

_LABEL: Final = b"vtpm-keeper endorsement primary seed v1\x00"


@dataclass(frozen=True)
class TpmIdentity:
    """A TPM version's identity: its fingerprint, or why it is unknown."""

    fingerprint: str | None
    """sha256 hex of the label and the EPSeed; None when unknown."""
    unknown_because: str | None = None
    needs_secret: bool = False
    """Unknown because the state is encrypted and no secret was given."""
    profile: StateProfile | None = None
    """The libtpms profile and format level the state needs; None when unreadable."""

    @property
    def known(self) -> bool:
        return self.fingerprint is not None


def seed_fingerprint(seed: bytes) -> str:
    """The one-way fingerprint of an endorsement primary seed."""
    return hashlib.sha256(_LABEL + seed).hexdigest()


def permall_identity(permall: bytes, passphrase: bytes | None = None) -> TpmIdentity:
    """The identity of a ``tpm2-00.permall``; ``passphrase``: the value of the libvirt
    secret an encrypted state was written with, when the store holds it."""
    try:
        blob = read_swtpm_blob(permall)
        if blob.encrypted:
            if passphrase is None:
                return TpmIdentity(
                    None, "the TPM state is encrypted with a secret not held", needs_secret=True
                )
            state = decrypt_state(blob, passphrase)
        else:
            state = plain_state(blob)
        seed = endorsement_seed(state)
    except PermallFormatError as error:
        return TpmIdentity(None, str(error))
    try:
        profile: StateProfile | None = state_profile(state)
    except PermallFormatError:
        profile = None  # the seed was readable: the identity stands without the profile
    return TpmIdentity(seed_fingerprint(seed), profile=profile)


def archive_identity(content: bytes, passphrase: bytes | None = None) -> TpmIdentity:
    """The identity of a TPM version's canonical content (the archive a host sends)."""
    try:
        files = unpack_tpm_state(content)
    except BlobFormatError as error:
        return TpmIdentity(None, f"not a TPM archive: {error}")
    permall = files.get(MAIN_STATE_FILE_NAME)
    if permall is None:
        return TpmIdentity(None, f"the archive holds no {MAIN_STATE_FILE_NAME}")
    return permall_identity(permall, passphrase)
