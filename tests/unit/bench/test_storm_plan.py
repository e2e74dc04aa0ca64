"""When the boot storm's VMs write and their hosts announce (`bench.storm.plan`): a state is
announced once it has been unchanged for the window, so writes of one kind closer together
than that are announced once, as the newest, whatever the bench process's own timing."""

from __future__ import annotations

from bench.scale import FakeVm
from bench.storm import BOOT_WRITES, Step, plan
from keeper_shared.messages.types import StateKind

TPM, NVRAM = StateKind.TPM, StateKind.NVRAM
WINDOW_S = 0.5


def announcements(steps: list[Step]) -> list[tuple[float, str, StateKind]]:
    # Rounded: the times are sums of gaps (0.1 + 0.2 is not 0.3 in floating point).
    return [(round(step.at_s, 6), step.vm.vm_id, step.kind) for step in steps if step.announce]


def test_a_boot_within_the_window_is_announced_once_per_kind_as_its_newest_write() -> None:
    vm = FakeVm("a", "h1")
    # Writes TPM 0.1, NVRAM 0.3, TPM 0.5, NVRAM 0.7, TPM 0.9: each kind 0.4 s apart.
    steps = plan([vm], {"a": [0.1, 0.2, 0.2, 0.2, 0.2]}, WINDOW_S)

    assert [(s.kind, s.announce) for s in steps if not s.announce] == [
        (kind, False) for kind in BOOT_WRITES
    ]
    assert announcements(steps) == [
        (1.2, "a", NVRAM),
        (1.4, "a", TPM),
    ]
    assert steps == sorted(steps, key=lambda step: step.at_s)


def test_a_write_left_alone_for_longer_than_the_window_is_announced_on_its_own() -> None:
    vm = FakeVm("b", "h2")
    # TPM 0.0, NVRAM 0.0, TPM 0.6 (0.6 s after the first TPM), NVRAM 0.6, TPM 0.6.
    steps = plan([vm], {"b": [0.0, 0.0, 0.6, 0.0, 0.0]}, WINDOW_S)

    assert announcements(steps) == [
        (0.5, "b", TPM),
        (0.5, "b", NVRAM),
        (1.1, "b", TPM),
        (1.1, "b", NVRAM),
    ]
    # The announcement at 0.5 s comes before the writes at 0.6 s, so it announces the
    # first write; the last ones follow them.
    first_rewrite = next(i for i, s in enumerate(steps) if s.at_s > 0.55 and not s.announce)
    assert all(s.announce for s in steps[2:first_rewrite])


def test_every_vm_of_a_fleet_is_planned() -> None:
    vms = [FakeVm(f"vm-{i}", f"h{i % 3}") for i in range(30)]
    steps = plan(vms, {vm.vm_id: [0.1] * len(BOOT_WRITES) for vm in vms}, WINDOW_S)

    assert len([s for s in steps if not s.announce]) == 30 * len(BOOT_WRITES)
    assert sorted(announcements(steps), key=lambda a: (a[1], a[2].value)) == sorted(
        [(0.9, vm.vm_id, NVRAM) for vm in vms] + [(1.0, vm.vm_id, TPM) for vm in vms],
        key=lambda a: (a[1], a[2].value),
    )
