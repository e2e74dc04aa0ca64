"""Which changes carry their state inline: the blob that was hashed, sealed to the store,
within the event's byte budget and the per-blob cap; never a VM whose TPM is encrypted with
a foreign secret; the budget's settings."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from keeper_host_agent.detect.announcer import ChangeAnnouncer
from keeper_host_agent.detect.inline_state import (
    InlineBudget,
    StateInliner,
    inline_candidate,
    inliner_for,
    sealed_size,
)
from keeper_host_agent.hypervisor.domain_xml import DomainStateLocation
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.messages.releases import CURRENT_RELEASE, upgrade_level
from keeper_shared.messages.state import StateChange, StateChanged
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.state_blobs import open_state_blob
from keeper_shared.state_format.blobs import seal_blob
from support.sealing_keys import new_keys

STORE = new_keys()


def _state(size: int, generation: int = 1) -> tuple[StateChange, StateBlob]:
    """A change and the blob it announces; random content, so it does not compress."""
    blob = seal_blob(StateKind.TPM, os.urandom(size), FencingToken(epoch=1, generation=generation))
    change = StateChange(
        vm_id=str(uuid.uuid4()),
        kind=blob.kind,
        content_hash=blob.content_hash,
        size=blob.size,
        token=blob.token,
    )
    return change, blob


def _inliner(per_event: int, per_blob: int) -> StateInliner:
    return StateInliner(STORE.public, InlineBudget(per_event, per_blob))


def test_an_inline_blob_opens_with_the_stores_key_to_the_blob_that_was_hashed() -> None:
    change, blob = _state(6_000)

    (inlined,) = _inliner(1 << 20, 1 << 20).inline([(change, blob)])

    assert inlined.sealed is not None
    assert open_state_blob(change.vm_id, inlined.sealed, STORE) == blob
    assert inlined.model_copy(update={"sealed": None}) == change
    with pytest.raises(SealingError):
        open_state_blob(change.vm_id, inlined.sealed, new_keys())


def test_the_event_budget_is_spent_in_order_and_what_is_left_goes_by_hash() -> None:
    batch = [_state(10_000, generation) for generation in range(1, 5)]
    one = max(sealed_size(blob) for _, blob in batch)

    changes = _inliner(3 * one, one).inline(batch)

    assert [change.sealed is not None for change in changes] == [True, True, True, False]
    assert [change.vm_id for change in changes] == [change.vm_id for change, _ in batch]


def test_a_blob_above_the_per_blob_cap_is_fetched_and_smaller_ones_still_fit() -> None:
    big = _state(200_000)
    small = _state(5_000)

    changes = _inliner(1 << 20, 100_000).inline([big, small])

    assert [change.sealed is not None for change in changes] == [False, True]


def test_a_zero_budget_inlines_nothing() -> None:
    changes = _inliner(0, 0).inline([_state(100), _state(100)])

    assert all(change.sealed is None for change in changes)


def _domain(secret: str | None) -> DomainStateLocation:
    return DomainStateLocation(
        vm_id=str(uuid.uuid4()),
        name="vm",
        epoch=1,
        tpm_dir=Path("/tmp/tpm2"),
        nvram_path=Path("/tmp/vm_VARS.fd"),
        arch="x86_64",
        machine="q35",
        tpm_model="tpm-crb",
        tpm_version="2.0",
        tpm_secret_uuid=secret,
    )


def test_a_vm_encrypted_with_a_foreign_secret_is_never_inlined() -> None:
    change, blob = _state(1_000)

    assert inline_candidate(_domain(None), blob) is blob
    # Its NVRAM too: the fetch brings the VM's secret with its state.
    candidate = inline_candidate(_domain(str(uuid.uuid4())), blob)
    assert candidate is None
    (sent,) = _inliner(1 << 20, 1 << 20).inline([(change, candidate)])
    assert sent.sealed is None


def test_a_per_blob_cap_above_the_event_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="per-blob cap"):
        InlineBudget(1_000, 2_000)


def _settings(**env: str) -> HostAgentSettings:
    return HostAgentSettings(
        host_id="hv01",
        sealing_key_file=Path("/nonexistent/key"),
        store_sealing_key=STORE.public.to_text(),
        **env,  # type: ignore[arg-type]
    )


def test_inline_state_is_off_unless_the_environment_sets_a_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Off by default: every change by its hash, pulled by the store, as the design says.
    assert _settings().inline_state_max_bytes == 0
    monkeypatch.setenv("KEEPER_HOST_INLINE_STATE_MAX_BYTES", "65536")
    monkeypatch.setenv("KEEPER_HOST_INLINE_BLOB_MAX_BYTES", "16384")

    settings = _settings()

    assert (settings.inline_state_max_bytes, settings.inline_blob_max_bytes) == (65536, 16384)


@pytest.mark.parametrize(
    "env",
    [
        {"inline_state_max_bytes": "1024", "inline_blob_max_bytes": "2048"},
        {"inline_state_max_bytes": str(5 * 1024 * 1024)},
        {"inline_state_max_bytes": "-1"},
    ],
)
def test_a_budget_that_cannot_work_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="inline"):
        _settings(**env)


async def test_the_announcer_inlines_what_fits_of_each_batch() -> None:
    published: list[StateChanged] = []

    async def publish(event: StateChanged) -> None:
        published.append(event)

    small, big = _state(2_000), _state(50_000)
    announcer = ChangeAnnouncer("hv01", publish, _inliner(1 << 20, 20_000))

    await announcer.announce(*small)
    await announcer.announce(*big)
    await announcer.announce(_state(2_000)[0])  # handed no blob: hash only

    changes = [change for event in published for change in event.changes]
    assert [change.sealed is not None for change in changes] == [True, False, False]


def test_an_agent_capped_at_0_1_0_inlines_nothing() -> None:
    # Its state.changed goes as v2, which has no place for inline state: nothing is sealed.
    assert inliner_for(upgrade_level("0.1.0"), STORE.public, InlineBudget()) is None
    assert inliner_for(upgrade_level(CURRENT_RELEASE), STORE.public, InlineBudget()) is not None
