"""The real swtpm and tpm2-tools through keeper_shared.swtpm.

The honest end-to-end check that a TPM survived a copy: seal a secret into an NV index,
stop swtpm, copy the state directory, start a new swtpm on the copy and read it back.
The corruption tests pin down what swtpm itself notices, which the scrubber relies on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from keeper_devtools.swtpm_lab import (
    DEMO_NV_INDEX,
    manufacture_tpm_state,
    nv_read_secret,
    nv_write_secret,
)
from keeper_shared.swtpm import PERMALL_NAME, SwtpmError, start_swtpm, swtpm_version
from support.process_table import swtpm_children

pytestmark = [pytest.mark.swtpm, pytest.mark.usefixtures("swtpm_tools", "no_swtpm_left")]

SECRET_SIZE = 32


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sealed_template(
    tmp_path_factory: pytest.TempPathFactory, ca_config: Path
) -> tuple[Path, bytes]:
    """A manufactured TPM state holding a random secret at DEMO_NV_INDEX."""
    state_dir = tmp_path_factory.mktemp("template") / "tpm2"
    secret = secrets.token_bytes(SECRET_SIZE)
    await manufacture_tpm_state(state_dir, config=ca_config)
    async with await start_swtpm(state_dir) as tpm:
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, secret)
    return state_dir, secret


@pytest.fixture
def sealed_copy(sealed_template: tuple[Path, bytes], tmp_path: Path) -> tuple[Path, bytes]:
    """A private copy of the sealed template for one test to start or damage."""
    template, secret = sealed_template
    copy = tmp_path / "copy" / "tpm2"
    shutil.copytree(template, copy)
    return copy, secret


def _flip(path: Path, offset: int, length: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + length, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


async def test_swtpm_version() -> None:
    version = await swtpm_version()
    print(f"swtpm version {version}")
    parts = version.split(".")
    assert len(parts) >= 2
    assert all(part.isdigit() for part in parts)


async def test_sealed_secret_survives_a_copy_of_the_state(tmp_path: Path, ca_config: Path) -> None:
    state_dir = tmp_path / "vm-a" / "tpm2"
    permall = state_dir / PERMALL_NAME
    started = time.monotonic()
    await manufacture_tpm_state(state_dir, config=ca_config)
    print(f"swtpm_setup took {time.monotonic() - started:.2f} s")
    assert (state_dir.stat().st_mode & 0o777) == 0o700
    assert (state_dir.parent.stat().st_mode & 0o777) == 0o700
    size_manufactured = permall.stat().st_size
    print(f"permall after manufacture: {size_manufactured} bytes")

    secret = secrets.token_bytes(SECRET_SIZE)
    started = time.monotonic()
    async with await start_swtpm(state_dir) as tpm:
        print(f"swtpm ready in {time.monotonic() - started:.3f} s on port {tpm.port}")
        assert tpm.tcti == f"swtpm:host=127.0.0.1,port={tpm.port}"
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, secret)
        started = time.monotonic()
    print(f"swtpm stopped in {time.monotonic() - started:.3f} s")
    assert tpm.returncode == 0
    size_sealed = permall.stat().st_size
    print(f"permall after sealing: {size_sealed} bytes")
    assert size_sealed > size_manufactured

    restored = tmp_path / "vm-b" / "tpm2"
    shutil.copytree(state_dir, restored)
    async with await start_swtpm(restored) as tpm:
        assert await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE) == secret
    assert tpm.returncode == 0


async def test_an_encrypted_state_loads_only_with_its_passphrase(
    tmp_path: Path, ca_config: Path
) -> None:
    """As libvirt does for a TPM with <encryption secret>: manufactured encrypted with the
    secret's value, the state opens only with that passphrase, and what it seals stays."""
    state_dir = tmp_path / "tpm2"
    passphrase = secrets.token_urlsafe(32).encode()
    secret = secrets.token_bytes(SECRET_SIZE)
    await manufacture_tpm_state(state_dir, config=ca_config, passphrase=passphrase)
    async with await start_swtpm(state_dir, passphrase=passphrase) as tpm:
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, secret)
    assert tpm.returncode == 0
    assert secret not in (state_dir / PERMALL_NAME).read_bytes()

    with pytest.raises(SwtpmError, match="GetDecryptedData"):
        await start_swtpm(state_dir)
    with pytest.raises(SwtpmError, match="GetDecryptedData"):
        await start_swtpm(state_dir, passphrase=secrets.token_urlsafe(32).encode())
    async with await start_swtpm(state_dir, passphrase=passphrase) as tpm:
        assert await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE) == secret


async def test_manufacture_with_the_system_config_as_libvirt_does(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the system CA in /var/lib/swtpm-localca is writable by root and tss only")
    state_dir = tmp_path / "tpm2"
    await manufacture_tpm_state(state_dir)
    assert (state_dir / PERMALL_NAME).stat().st_size > 0


async def test_manufacture_refuses_existing_state_unless_overwrite(
    sealed_copy: tuple[Path, bytes], ca_config: Path
) -> None:
    state_dir, _secret = sealed_copy
    before = (state_dir / PERMALL_NAME).read_bytes()
    with pytest.raises(SwtpmError, match="existing TPM state"):
        await manufacture_tpm_state(state_dir, config=ca_config)
    assert (state_dir / PERMALL_NAME).read_bytes() == before

    await manufacture_tpm_state(state_dir, config=ca_config, overwrite=True)
    async with await start_swtpm(state_dir) as tpm:
        # A newly manufactured TPM: the sealed index is gone.
        with pytest.raises(SwtpmError, match="tpm2_nvread"):
            await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE)


async def test_start_refuses_a_directory_without_state(tmp_path: Path) -> None:
    with pytest.raises(SwtpmError, match="no TPM state"):
        await start_swtpm(tmp_path)
    # swtpm itself would have manufactured a blank TPM here.
    assert list(tmp_path.iterdir()) == []


async def test_second_swtpm_on_the_same_state_is_refused(sealed_copy: tuple[Path, bytes]) -> None:
    state_dir, secret = sealed_copy
    async with await start_swtpm(state_dir) as tpm:
        with pytest.raises(SwtpmError, match="lock"):
            await start_swtpm(state_dir)
        assert await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE) == secret


async def test_context_exit_stops_swtpm_on_error(sealed_copy: tuple[Path, bytes]) -> None:
    state_dir, _secret = sealed_copy
    tpm = await start_swtpm(state_dir)
    with pytest.raises(LookupError, match="boom"):
        async with tpm:
            raise LookupError("boom")
    assert tpm.returncode == 0
    await tpm.stop()  # idempotent


async def test_cancelled_task_stops_swtpm(sealed_copy: tuple[Path, bytes]) -> None:
    state_dir, _secret = sealed_copy
    entered = asyncio.Event()
    pids: list[int] = []

    async def hold() -> None:
        async with await start_swtpm(state_dir) as tpm:
            pids.append(tpm.pid)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pids
    assert swtpm_children() == []


async def test_stop_kills_a_hung_swtpm(sealed_copy: tuple[Path, bytes]) -> None:
    state_dir, _secret = sealed_copy
    tpm = await start_swtpm(state_dir)
    # A stopped process handles neither CMD_SHUTDOWN nor SIGTERM.
    os.kill(tpm.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(SwtpmError, match="killed"):
        await tpm.stop()
    print(f"hung swtpm killed after {time.monotonic() - started:.1f} s")
    assert tpm.returncode == -9


async def test_broken_header_makes_start_fail(sealed_copy: tuple[Path, bytes]) -> None:
    state_dir, _secret = sealed_copy
    _flip(state_dir / PERMALL_NAME, 0)
    with pytest.raises(SwtpmError, match="Could not initialize libtpms") as caught:
        await start_swtpm(state_dir)
    print(f"broken header: {caught.value}")
    # libtpms quotes the bytes it found instead of the magic; those are state bytes.
    assert re.search(r"0x[0-9a-fA-F]", str(caught.value)) is None


async def test_truncated_state_makes_start_fail(sealed_copy: tuple[Path, bytes]) -> None:
    state_dir, _secret = sealed_copy
    permall = state_dir / PERMALL_NAME
    permall.write_bytes(permall.read_bytes()[:-1])
    with pytest.raises(SwtpmError, match="Could not initialize libtpms") as caught:
        await start_swtpm(state_dir)
    print(f"truncated by one byte: {caught.value}")


async def test_flipped_bytes_in_the_middle_go_unnoticed(sealed_copy: tuple[Path, bytes]) -> None:
    """The unencrypted permall has no checksum: swtpm is no integrity check.

    Whoever needs to know that a state is intact (the store, its scrubber) must compare
    hashes; a clean start and a good read do not prove it.
    """
    state_dir, secret = sealed_copy
    permall = state_dir / PERMALL_NAME
    _flip(permall, permall.stat().st_size // 2)
    async with await start_swtpm(state_dir) as tpm:
        assert await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE) == secret


async def test_flipped_nv_data_reads_back_silently_different(
    sealed_copy: tuple[Path, bytes],
) -> None:
    """NV index data is stored in the clear and read back without any check."""
    state_dir, secret = sealed_copy
    permall = state_dir / PERMALL_NAME
    offset = permall.read_bytes().find(secret)
    assert offset >= 0, "the sealed secret is expected in the clear in the permall"
    _flip(permall, offset, 4)
    async with await start_swtpm(state_dir) as tpm:
        read = await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE)
    assert read != secret
    assert read[4:] == secret[4:]


async def test_errors_and_logs_never_carry_the_secret(
    tmp_path: Path,
    ca_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # At trace level the TSS dumps command buffers, NV data included, to stderr.
    monkeypatch.setenv("TSS2_LOG", "all+TRACE")
    caplog.set_level(logging.DEBUG)
    state_dir = tmp_path / "tpm2"
    await manufacture_tpm_state(state_dir, config=ca_config)
    secret = secrets.token_bytes(SECRET_SIZE)
    errors: list[str] = []
    async with await start_swtpm(state_dir) as tpm:
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, secret)
        with pytest.raises(SwtpmError) as redefine:
            await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, secret)
        errors.append(str(redefine.value))
        with pytest.raises(SwtpmError) as too_long:
            await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE + 1)
        errors.append(str(too_long.value))
        assert await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE) == secret
    print("\n".join(errors))
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]
    for text in [*errors, caplog.text]:
        assert not any(form in text for form in forms)
        assert secret.decode("latin-1") not in text


async def test_bad_arguments_are_refused_before_any_tool_runs() -> None:
    with pytest.raises(ValueError, match="outside"):
        await nv_write_secret("swtpm:host=127.0.0.1,port=1", 0x81000001, b"x")
    with pytest.raises(ValueError, match="bytes"):
        await nv_write_secret("swtpm:host=127.0.0.1,port=1", DEMO_NV_INDEX, b"")
    with pytest.raises(ValueError, match="size"):
        await nv_read_secret("swtpm:host=127.0.0.1,port=1", DEMO_NV_INDEX, 0)
