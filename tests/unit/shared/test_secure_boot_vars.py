"""The Secure Boot variable reader (tests/support/secure_boot_vars.py) on Debian's own OVMF
NVRAM templates: the one with Microsoft's keys enrolled and the blank one. The real-host
Secure Boot test trusts this reader to tell an enrolled NVRAM from a blank one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.secure_boot_vars import read_secure_boot_variables

OVMF_DIR = Path("/usr/share/OVMF")
ENROLLED_TEMPLATE = OVMF_DIR / "OVMF_VARS_4M.ms.fd"
BLANK_TEMPLATE = OVMF_DIR / "OVMF_VARS_4M.fd"


def debian_template(path: Path) -> Path:
    """``path`` from Debian's ovmf package; skipped without it, but a failure under CI=true."""
    if not path.is_file():
        reason = f"{path} is missing (Debian's ovmf package is not installed)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true: this test must not skip")
        pytest.skip(reason)
    return path


def test_the_microsoft_template_has_keys_enrolled_and_secure_boot_on() -> None:
    variables = read_secure_boot_variables(debian_template(ENROLLED_TEMPLATE))
    assert {"PK", "KEK", "db", "dbx"} <= set(variables.keys)
    assert len(variables.keys["PK"]) == 1, "one platform key"
    assert all(sig.list_type == "EfiCertX509" for sig in variables.keys["PK"])
    # Microsoft's KEK and its Windows and UEFI CA certificates in db are the point of the
    # template: Windows' boot loader and shim are signed with them.
    assert any("Microsoft" in subject for subject in variables.subjects("KEK"))
    assert any("Windows Production PCA" in subject for subject in variables.subjects("db"))
    assert any("UEFI CA" in subject for subject in variables.subjects("db"))
    assert variables.secure_boot_enable is True
    assert variables.custom_mode is False
    assert variables.secure_boot_enabled
    assert set(variables.raw) == {"PK", "KEK", "db", "dbx", "SecureBootEnable", "CustomMode"}


def test_the_blank_template_has_no_keys_and_secure_boot_off() -> None:
    variables = read_secure_boot_variables(debian_template(BLANK_TEMPLATE))
    assert variables.keys == {}
    assert variables.raw == {}
    assert variables.secure_boot_enable is None
    assert not variables.secure_boot_enabled


def test_a_file_that_is_no_varstore_is_refused_with_its_name(tmp_path: Path) -> None:
    not_nvram = tmp_path / "disk.img"
    not_nvram.write_bytes(b"\0" * 128 * 1024)
    with pytest.raises(ValueError, match=r"disk\.img: no edk2 variable store"):
        read_secure_boot_variables(not_nvram)
