"""The per-host pull coalescer (`keeper_state_store.handlers.pull_batcher`) with a fake fetch.

What the store relies on: requests for one host that arrive together share one fetch;
requests that arrive while a fetch is in flight share the next one; each caller returns
only after the fetch that carried its VM completed, and gets its own VM's error (or the
fetch's); hosts never wait for each other; a batch never exceeds its VM limit.
"""

from __future__ import annotations

import asyncio

import pytest

from keeper_shared.messages.types import StateKind
from keeper_state_store.handlers.pull_batcher import PullBatcher, PullResults

WINDOW_S = 0.01


class FakePull:
    """Records every batch; takes ``delay_s``; fails the VMs in ``fail`` or everything."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[str, dict[str, set[StateKind]]]] = []
        self.done: set[str] = set()
        self.fail: set[str] = set()
        self.fetch_error: Exception | None = None

    async def __call__(self, host: str, kinds: dict[str, set[StateKind]]) -> PullResults:
        self.batches.append((host, {vm: set(wanted) for vm, wanted in kinds.items()}))
        await asyncio.sleep(self.delay_s)
        if self.fetch_error is not None:
            raise self.fetch_error
        self.done.update(vm for vm in kinds if vm not in self.fail)
        return {
            vm: (RuntimeError(f"write of {vm} failed") if vm in self.fail else None) for vm in kinds
        }


async def test_requests_arriving_together_share_one_fetch() -> None:
    pull = FakePull()
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)

    await asyncio.gather(
        *(batcher.pull("host-a", f"vm-{i}", StateKind.TPM) for i in range(20)),
        batcher.pull("host-a", "vm-0", StateKind.NVRAM),
    )

    assert len(pull.batches) == 1
    host, kinds = pull.batches[0]
    assert host == "host-a"
    assert len(kinds) == 20
    assert kinds["vm-0"] == {StateKind.TPM, StateKind.NVRAM}


async def test_each_caller_returns_only_after_its_fetch_completed() -> None:
    pull = FakePull(delay_s=0.05)
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)

    async def pull_and_check(vm: str) -> None:
        await batcher.pull("host-a", vm, StateKind.TPM)
        assert vm in pull.done

    await asyncio.gather(*(pull_and_check(f"vm-{i}") for i in range(5)))


async def test_requests_during_a_fetch_join_the_next_one() -> None:
    pull = FakePull(delay_s=0.1)
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)

    first = asyncio.create_task(batcher.pull("host-a", "vm-first", StateKind.TPM))
    await asyncio.sleep(WINDOW_S * 3)  # the first fetch is now in flight
    assert len(pull.batches) == 1
    later = [
        asyncio.create_task(batcher.pull("host-a", f"vm-{i}", StateKind.TPM)) for i in range(10)
    ]
    await asyncio.gather(first, *later)

    assert [len(kinds) for _, kinds in pull.batches] == [1, 10]


async def test_hosts_are_batched_separately_and_concurrently() -> None:
    pull = FakePull(delay_s=0.2)
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)

    async with asyncio.timeout(0.35):  # one fetch's time, not two: the hosts overlap
        await asyncio.gather(
            batcher.pull("host-a", "vm-a", StateKind.TPM),
            batcher.pull("host-b", "vm-b", StateKind.TPM),
        )
    assert sorted(host for host, _ in pull.batches) == ["host-a", "host-b"]


async def test_a_batch_never_exceeds_its_vm_limit() -> None:
    pull = FakePull()
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=4, max_in_flight=4)

    await asyncio.gather(*(batcher.pull("host-a", f"vm-{i}", StateKind.TPM) for i in range(10)))

    assert [len(kinds) for _, kinds in pull.batches] == [4, 4, 2]
    assert len(pull.done) == 10


async def test_a_failed_write_fails_only_its_own_callers() -> None:
    pull = FakePull()
    pull.fail = {"vm-bad"}
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)

    results = await asyncio.gather(
        batcher.pull("host-a", "vm-good", StateKind.TPM),
        batcher.pull("host-a", "vm-bad", StateKind.TPM),
        batcher.pull("host-a", "vm-bad", StateKind.NVRAM),
        return_exceptions=True,
    )

    assert results[0] is None
    assert all(isinstance(result, RuntimeError) for result in results[1:])


async def test_a_failed_fetch_fails_every_caller_of_that_batch_then_recovers() -> None:
    pull = FakePull()
    pull.fetch_error = TimeoutError("no reply")
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)

    results = await asyncio.gather(
        *(batcher.pull("host-a", f"vm-{i}", StateKind.TPM) for i in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(result, TimeoutError) for result in results)

    pull.fetch_error = None
    await batcher.pull("host-a", "vm-0", StateKind.TPM)  # a redelivery goes through
    assert "vm-0" in pull.done


async def test_close_cancels_waiting_callers_instead_of_leaving_them_hanging() -> None:
    pull = FakePull(delay_s=10)
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)
    waiting = asyncio.create_task(batcher.pull("host-a", "vm-0", StateKind.TPM))
    await asyncio.sleep(WINDOW_S * 3)

    await batcher.close()

    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    pull = FakePull(delay_s=0.05)
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=4)
    gone = asyncio.create_task(batcher.pull("host-a", "vm-gone", StateKind.TPM))
    stays = asyncio.create_task(batcher.pull("host-a", "vm-stays", StateKind.TPM))
    await asyncio.sleep(WINDOW_S * 2)
    gone.cancel()

    await stays
    assert "vm-stays" in pull.done


class GatedPull(FakePull):
    """A fetch that holds every batch until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started: asyncio.Queue[None] = asyncio.Queue()
        """One item per batch whose fetch began."""

    async def __call__(self, host: str, kinds: dict[str, set[StateKind]]) -> PullResults:
        self.batches.append((host, {vm: set(wanted) for vm, wanted in kinds.items()}))
        self.started.put_nowait(None)
        await self.gate.wait()
        self.done.update(kinds)
        return dict.fromkeys(kinds)


async def test_a_request_to_an_idle_host_does_not_wait_for_the_window() -> None:
    pull = FakePull()
    batcher = PullBatcher(pull, window_s=60.0, max_vms=32, max_in_flight=4)

    async with asyncio.timeout(10):  # far below the window: nothing waited for it
        await batcher.pull("host-a", "vm-0", StateKind.TPM)
    assert pull.done == {"vm-0"}


async def test_the_next_batch_is_fetched_while_the_previous_one_is_in_flight() -> None:
    pull = GatedPull()
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=2)

    async with asyncio.timeout(10):
        first = asyncio.create_task(batcher.pull("host-a", "vm-first", StateKind.TPM))
        await pull.started.get()
        second = asyncio.create_task(batcher.pull("host-a", "vm-second", StateKind.TPM))
        await pull.started.get()  # the second fetch began while the first is still held
        assert not first.done()
        pull.gate.set()
        await asyncio.gather(first, second)
    assert pull.done == {"vm-first", "vm-second"}


async def test_no_more_batches_than_allowed_are_in_flight_per_host() -> None:
    pull = GatedPull()
    batcher = PullBatcher(pull, window_s=WINDOW_S, max_vms=32, max_in_flight=1)

    async with asyncio.timeout(10):
        first = asyncio.create_task(batcher.pull("host-a", "vm-first", StateKind.TPM))
        await pull.started.get()
        later = [
            asyncio.create_task(batcher.pull("host-a", f"vm-{i}", StateKind.TPM)) for i in range(3)
        ]
        for _ in range(5):  # several windows pass; the held fetch keeps the slot
            await asyncio.sleep(WINDOW_S)
        assert len(pull.batches) == 1
        pull.gate.set()
        await asyncio.gather(first, *later)
    assert [len(kinds) for _, kinds in pull.batches] == [1, 3]
