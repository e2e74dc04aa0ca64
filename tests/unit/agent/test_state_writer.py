"""Writing TPM and NVRAM state into place on a host (invariant 5)."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keeper_devtools.swtpm_lab import permall_framing
from keeper_host_agent.files.state_writer import (
    InvalidVmIdError,
    UnsafeStateWriteError,
    validate_vm_id,
    write_nvram,
    write_tpm_state,
)

VM_ID = "6f1d2c3b-9a8e-4f7d-b6c5-a4b3c2d1e0f9"
PERMALL = "tpm2-00.permall"
VOLATILE = "tpm2-00.volatilestate"
SAVESTATE = "tpm2-00.savestate"
CANARY = b"CANARY-WRITER-SECRET-91f0"
OLD_STATE = {
    PERMALL: permall_framing(b"old permall " + CANARY),
    VOLATILE: b"old volatile " + CANARY,
}
NEW_STATE = {PERMALL: permall_framing(b"new permall " + CANARY), SAVESTATE: b"new savestate"}


@pytest.fixture
def swtpm_root(tmp_path: Path) -> Path:
    root = tmp_path / "swtpm"
    root.mkdir(mode=0o711)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory a planted symlink points at; nothing may ever land in it."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    return target


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would strip even the owner's write bit if modes were left to it."""
    previous = os.umask(0o277)
    try:
        yield
    finally:
        os.umask(previous)


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }


def _state_files(tpm2: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in tpm2.iterdir()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ------------------------------------------------------------------------ VM ids


@pytest.mark.parametrize("value", [VM_ID, VM_ID.upper()])
def test_canonical_vm_ids_are_accepted(value: str) -> None:
    assert validate_vm_id(value) == uuid.UUID(VM_ID)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../x",
        "a/b",
        "x" * 10_240,
        "../" * 12,
        VM_ID + "/..",
        "/" + VM_ID[1:],
        "{" + VM_ID[:-2] + "}",
        VM_ID.replace("-", ""),
        "urn:uuid:" + VM_ID,
        " " + VM_ID,
        VM_ID + "\n",
        VM_ID[:-1] + "g",
        VM_ID[:8] + "/" + VM_ID[9:],
        VM_ID[:-1] + "\0",
        ".",
    ],
)
def test_malicious_vm_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidVmIdError) as caught:
        validate_vm_id(value)
    assert len(str(caught.value)) < 250
    assert "\n" not in str(caught.value)


def test_non_string_vm_id_is_refused() -> None:
    with pytest.raises(InvalidVmIdError, match="must be a string"):
        validate_vm_id(uuid.UUID(VM_ID))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["../x", "a/b", "x" * 10_240, "..", ""])
def test_write_refuses_malicious_vm_ids_before_touching_disk(swtpm_root: Path, value: str) -> None:
    with pytest.raises(InvalidVmIdError):
        write_tpm_state(swtpm_root, value, OLD_STATE, None)
    assert list(swtpm_root.parent.rglob("*")) == [swtpm_root]


# ------------------------------------------------------------------------ TPM state


def test_fresh_write_creates_dirs_and_files_with_libvirt_modes(
    swtpm_root: Path, strict_umask: None
) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    assert tpm2 == swtpm_root / VM_ID / "tpm2"
    assert _mode(swtpm_root / VM_ID) == 0o711
    assert _mode(tpm2) == 0o700
    assert _state_files(tpm2) == OLD_STATE
    for name in OLD_STATE:
        assert _mode(tpm2 / name) == 0o600
        assert stat.S_ISREG((tpm2 / name).lstat().st_mode)


def test_upper_case_vm_id_writes_the_lower_case_directory(swtpm_root: Path) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID.upper(), OLD_STATE, None)
    assert tpm2 == swtpm_root / VM_ID / "tpm2"
    assert [path.name for path in swtpm_root.iterdir()] == [VM_ID]


def test_owner_is_applied_to_tpm2_and_files(swtpm_root: Path) -> None:
    owner = (4242, 4343) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, owner)
    for path in [tpm2, tpm2 / PERMALL, tpm2 / VOLATILE]:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == owner
    vm_dir = (swtpm_root / VM_ID).lstat()
    assert (vm_dir.st_uid, vm_dir.st_gid) == (os.getuid(), os.getgid())


def test_rewrite_replaces_state_and_removes_stale_companions(swtpm_root: Path) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    (tpm2 / ".lock").write_bytes(b"")
    write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    # The stale volatilestate would be loaded over the new permall; it must be gone.
    assert _state_files(tpm2) == {**NEW_STATE, ".lock": b""}


def test_rewrite_with_permall_only_removes_both_companions(swtpm_root: Path) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, {**OLD_STATE, SAVESTATE: b"s"}, None)
    write_tpm_state(swtpm_root, VM_ID, {PERMALL: permall_framing(b"p")}, None)
    assert _state_files(tpm2) == {PERMALL: permall_framing(b"p")}


def test_existing_directories_are_reused(swtpm_root: Path) -> None:
    tpm2 = swtpm_root / VM_ID / "tpm2"
    tpm2.mkdir(parents=True, mode=0o700)
    write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    assert _state_files(tpm2) == OLD_STATE


def test_missing_swtpm_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeStateWriteError, match="not an existing directory"):
        write_tpm_state(tmp_path / "absent", VM_ID, OLD_STATE, None)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    "files",
    [
        {PERMALL: b"x", "../../etc/passwd": b"y"},
        {PERMALL: b"x", ".lock": b""},
        {PERMALL: b"x", "tpm2-00.permall.bak": b""},
        {VOLATILE: b"no permall"},
        {},
        {PERMALL: bytes(1024 * 1024 + 1)},
        {PERMALL: "not bytes"},
    ],
    ids=["traversal", "lock", "backup", "no-permall", "empty", "too-big", "not-bytes"],
)
def test_bad_file_sets_are_refused_and_old_state_kept(
    swtpm_root: Path, files: dict[str, bytes]
) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    before = _tree(swtpm_root.parent)
    with pytest.raises(UnsafeStateWriteError) as caught:
        write_tpm_state(swtpm_root, VM_ID, files, None)
    assert CANARY.decode() not in str(caught.value)
    assert _tree(swtpm_root.parent) == before
    assert _state_files(tpm2) == OLD_STATE


GOOD_PERMALL = permall_framing(b"a TPM " + CANARY + bytes(2000))


@pytest.mark.parametrize(
    ("permall", "reason"),
    [
        (b"", "is empty (0 bytes)"),
        (GOOD_PERMALL[:7], "shorter than swtpm's 10-byte state header: truncated"),
        (GOOD_PERMALL[:-100], "its swtpm header says"),
        (permall_framing(bytes(300 * 1024)), "more than the 262144"),
    ],
    ids=["empty", "below-the-header", "truncated", "too-large"],
)
def test_a_permall_swtpm_could_not_load_is_refused_before_anything_is_written(
    swtpm_root: Path, permall: bytes, reason: str
) -> None:
    # On a host that never had this VM, not even its directory appears.
    with pytest.raises(UnsafeStateWriteError, match="left as it was"):
        write_tpm_state(swtpm_root, str(uuid.uuid4()), {PERMALL: permall}, None)
    assert list(swtpm_root.iterdir()) == []

    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    before = _tree(swtpm_root.parent)
    with pytest.raises(UnsafeStateWriteError) as caught:
        write_tpm_state(swtpm_root, VM_ID, {PERMALL: permall, SAVESTATE: b"s"}, None)
    assert reason in str(caught.value)
    assert CANARY.decode() not in str(caught.value)
    assert _tree(swtpm_root.parent) == before
    assert _state_files(tpm2) == OLD_STATE


def test_symlinked_vm_dir_is_refused(swtpm_root: Path, outside: Path) -> None:
    (swtpm_root / VM_ID).symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.raises(UnsafeStateWriteError, match="symlink or not a directory"):
        write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    assert _tree(outside) == before


def test_dangling_symlinked_vm_dir_is_refused(swtpm_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    (swtpm_root / VM_ID).symlink_to(target)
    with pytest.raises(UnsafeStateWriteError, match="symlink or not a directory"):
        write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    assert not target.exists()


def test_symlinked_tpm2_dir_is_refused(swtpm_root: Path, outside: Path) -> None:
    (swtpm_root / VM_ID).mkdir()
    (swtpm_root / VM_ID / "tpm2").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.raises(UnsafeStateWriteError, match="symlink or not a directory"):
        write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    assert _tree(outside) == before


@pytest.mark.parametrize("where", ["vm", "tpm2"])
def test_regular_file_in_place_of_a_directory_is_refused(swtpm_root: Path, where: str) -> None:
    if where == "vm":
        (swtpm_root / VM_ID).write_bytes(b"")
    else:
        (swtpm_root / VM_ID).mkdir()
        (swtpm_root / VM_ID / "tpm2").write_bytes(b"")
    with pytest.raises(UnsafeStateWriteError, match="symlink or not a directory"):
        write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)


@pytest.mark.parametrize("name", [PERMALL, VOLATILE, SAVESTATE])
def test_symlinked_state_file_is_refused(swtpm_root: Path, outside: Path, name: str) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    (tpm2 / name).unlink(missing_ok=True)
    (tpm2 / name).symlink_to(outside / "passwd")
    before_outside = _tree(outside)
    with pytest.raises(UnsafeStateWriteError, match="not a regular file"):
        write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    assert _tree(outside) == before_outside
    assert (tpm2 / name).is_symlink()


def test_directory_in_place_of_a_state_file_is_refused(swtpm_root: Path) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    (tpm2 / SAVESTATE).mkdir()
    with pytest.raises(UnsafeStateWriteError, match="not a regular file"):
        write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    assert (tpm2 / PERMALL).read_bytes() == OLD_STATE[PERMALL]
    assert (tpm2 / VOLATILE).read_bytes() == OLD_STATE[VOLATILE]


def test_vm_dir_swapped_for_a_symlink_mid_write_is_not_followed(
    swtpm_root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if path == VM_ID:
            # An attacker replaces the fresh directory with a symlink before it is opened.
            os.rmdir(path, dir_fd=dir_fd)
            os.symlink(outside, path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    before = _tree(outside)
    with pytest.raises(UnsafeStateWriteError, match="symlink or not a directory"):
        write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    assert _tree(outside) == before


def _failing_on_call(
    real: Callable[..., Any], failing_call: int, error: OSError
) -> Callable[..., Any]:
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise error
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("failing_call", [1, 2])
def test_fsync_failure_while_writing_leaves_old_state_untouched(
    swtpm_root: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    before = _tree(swtpm_root)
    error = OSError(errno.EIO, "simulated I/O error")
    monkeypatch.setattr(os, "fsync", _failing_on_call(os.fsync, failing_call, error))
    with pytest.raises(OSError, match="simulated"):
        write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    assert _tree(swtpm_root) == before
    assert _state_files(tpm2) == OLD_STATE


def test_disk_full_while_writing_leaves_old_state_untouched(
    swtpm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    error = OSError(errno.ENOSPC, "simulated disk full")
    monkeypatch.setattr(os, "write", _failing_on_call(os.write, 2, error))
    with pytest.raises(OSError, match="disk full"):
        write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    assert _state_files(tpm2) == OLD_STATE


def test_rename_failure_leaves_the_old_permall_and_no_temp_files(
    swtpm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    error = OSError(errno.EIO, "simulated rename failure")
    monkeypatch.setattr(os, "replace", _failing_on_call(os.replace, 1, error))
    with pytest.raises(OSError, match="rename failure"):
        write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    # The companions were already gone; the old permall alone is a loadable TPM.
    assert _state_files(tpm2) == {PERMALL: OLD_STATE[PERMALL]}


def test_failure_after_permall_leaves_new_permall_without_stale_companions(
    swtpm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tpm2 = write_tpm_state(swtpm_root, VM_ID, OLD_STATE, None)
    error = OSError(errno.EIO, "simulated rename failure")
    monkeypatch.setattr(os, "replace", _failing_on_call(os.replace, 2, error))
    with pytest.raises(OSError, match="rename failure"):
        write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    assert _state_files(tpm2) == {PERMALL: NEW_STATE[PERMALL]}
    monkeypatch.undo()
    write_tpm_state(swtpm_root, VM_ID, NEW_STATE, None)
    assert _state_files(tpm2) == NEW_STATE


# ------------------------------------------------------------------------ NVRAM


@pytest.fixture
def nvram_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "qemu" / "nvram"
    directory.mkdir(parents=True)
    return directory


def test_nvram_is_written_with_mode_0600(nvram_dir: Path, strict_umask: None) -> None:
    target = nvram_dir / "vm1_VARS.fd"
    write_nvram(target, b"\xff" * 4096 + CANARY, None)
    assert target.read_bytes() == b"\xff" * 4096 + CANARY
    assert _mode(target) == 0o600
    assert [path.name for path in nvram_dir.iterdir()] == ["vm1_VARS.fd"]


def test_nvram_replaces_the_existing_file(nvram_dir: Path) -> None:
    target = nvram_dir / "vm1_VARS.fd"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_nvram(target, b"new", None)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600


def test_nvram_owner_is_applied(nvram_dir: Path) -> None:
    owner = (4242, 4343) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    target = nvram_dir / "vm1_VARS.fd"
    write_nvram(target, b"data", owner)
    assert (target.stat().st_uid, target.stat().st_gid) == owner


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("relative/vm1_VARS.fd", "not absolute"),
        ("vm1_VARS.fd", "not absolute"),
        ("/var/lib/libvirt/qemu/nvram/../../../../etc/passwd", r"contains '\.\.'"),
        ("/var/lib/libvirt/qemu/nvram/..", r"contains '\.\.'"),
        ("/", "does not name a file"),
        ("/var/lib/libvirt/qemu/nvram/", "does not name a file"),
        ("/var/lib/x\0y", "NUL"),
    ],
)
def test_bad_nvram_paths_are_refused(path: str, reason: str) -> None:
    # The text from the domain XML is checked as written, before Path normalises it.
    with pytest.raises(UnsafeStateWriteError, match=reason):
        write_nvram(path, b"data", None)


def test_nvram_parent_missing_is_refused(nvram_dir: Path) -> None:
    with pytest.raises(UnsafeStateWriteError, match="does not exist"):
        write_nvram(nvram_dir / "absent" / "vm1_VARS.fd", b"data", None)


def test_nvram_symlinked_parent_is_refused(nvram_dir: Path, outside: Path) -> None:
    link = nvram_dir / "link"
    link.symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.raises(UnsafeStateWriteError, match="symlink or not a directory"):
        write_nvram(link / "passwd", b"owned", None)
    assert _tree(outside) == before


def test_nvram_symlinked_target_is_refused(nvram_dir: Path, outside: Path) -> None:
    target = nvram_dir / "vm1_VARS.fd"
    target.symlink_to(outside / "passwd")
    before = _tree(outside)
    with pytest.raises(UnsafeStateWriteError, match="not a regular file"):
        write_nvram(target, b"owned", None)
    assert _tree(outside) == before
    assert target.is_symlink()


def test_nvram_directory_target_is_refused(nvram_dir: Path) -> None:
    (nvram_dir / "vm1_VARS.fd").mkdir()
    with pytest.raises(UnsafeStateWriteError, match="not a regular file"):
        write_nvram(nvram_dir / "vm1_VARS.fd", b"data", None)


def test_nvram_non_bytes_is_refused(nvram_dir: Path) -> None:
    with pytest.raises(UnsafeStateWriteError, match="must be bytes"):
        write_nvram(nvram_dir / "vm1_VARS.fd", "text", None)  # type: ignore[arg-type]


def test_nvram_fsync_failure_keeps_old_file_and_leaves_no_temp(
    nvram_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = nvram_dir / "vm1_VARS.fd"
    target.write_bytes(b"old nvram")
    error = OSError(errno.EIO, "simulated I/O error")
    monkeypatch.setattr(os, "fsync", _failing_on_call(os.fsync, 1, error))
    with pytest.raises(OSError, match="simulated"):
        write_nvram(target, b"new nvram " + CANARY, None)
    assert target.read_bytes() == b"old nvram"
    assert [path.name for path in nvram_dir.iterdir()] == ["vm1_VARS.fd"]


def test_nvram_rename_failure_keeps_old_file_and_leaves_no_temp(
    nvram_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = nvram_dir / "vm1_VARS.fd"
    target.write_bytes(b"old nvram")
    error = OSError(errno.EIO, "simulated rename failure")
    monkeypatch.setattr(os, "replace", _failing_on_call(os.replace, 1, error))
    with pytest.raises(OSError, match="rename failure"):
        write_nvram(target, b"new nvram", None)
    assert target.read_bytes() == b"old nvram"
    assert [path.name for path in nvram_dir.iterdir()] == ["vm1_VARS.fd"]
