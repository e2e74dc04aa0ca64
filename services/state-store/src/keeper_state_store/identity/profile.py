"""The libtpms profile and StateFormatLevel of a TPM 2 state. Pure: no I/O.

A state libtpms 0.10 or later wrote carries its profile as JSON (``{"ActiveProfile":
{"Name": ..., "StateFormatLevel": ..., ...}}``); one written by libtpms 0.9 or older carries
none and is the ``null`` profile, level 1, to every libtpms (see `keeper_shared.libtpms`).
libtpms itself takes level 1 when the JSON names no level, and so does this reader.
"""

from __future__ import annotations

import json
from typing import Final

from keeper_shared.libtpms import NULL_PROFILE_LEVEL, NULL_STATE_PROFILE, StateProfile
from keeper_state_store.identity.permall import PermallFormatError, profile_text

MAX_PROFILE_NAME: Final = 32
"""libtpms' ``MAX_PROFILE_NAME_LEN``."""


def state_profile(state: bytes) -> StateProfile:
    """The profile of a libtpms TPM 2 permanent state (``PERSISTENT_ALL``)."""
    text = profile_text(state)
    if text is None:
        return NULL_STATE_PROFILE
    try:
        active = json.loads(text)["ActiveProfile"]
        name = active["Name"]
        level = active.get("StateFormatLevel", NULL_PROFILE_LEVEL)
    except (ValueError, KeyError, TypeError):
        raise PermallFormatError("the state's profile is not libtpms' profile JSON") from None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_PROFILE_NAME:
        raise PermallFormatError("the state's profile has no usable name")
    if not isinstance(level, int) or isinstance(level, bool) or level < 1:
        raise PermallFormatError("the state's profile has no usable StateFormatLevel")
    return StateProfile(name, level)
