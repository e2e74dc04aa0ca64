"""swtpm and tpm2-tools as the demo, the benchmarks and the tests use them: manufacture a
TPM the way libvirt does, play the guest that seals a secret into an NV index and reads it
back (the honest check that a restored TPM is the same TPM), and frame chosen bytes as a
permall swtpm would store. Never needed on a host."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from keeper_host_agent.files.permall_check import (
    LIBTPMS_HEADER,
    PERSISTENT_ALL_MAGIC,
    SWTPM_HEADER,
    TAG_DATA,
    TLV_HEADER,
)
from keeper_shared.swtpm import (
    PERMALL_NAME,
    SwtpmError,
    check_option_value,
    make_private_dir,
    passphrase_pipe,
    run_tool,
    tail_output,
)

_LOG = logging.getLogger(__name__)

DEMO_NV_INDEX = 0x1500016
"""The owner-defined NV index the demo guest seals its secret into."""

# Owner-defined NV indices live in 0x01000000-0x01FFFFFF (TPM 2.0 part 2, handle type 01).
_NV_INDEX_MIN = 0x0100_0000
_NV_INDEX_MAX = 0x01FF_FFFF
# libtpms' MAX_NV_INDEX_SIZE; tpm2_nvdefine rejects more.
_NV_MAX_SIZE = 2048
_SETUP_LIMIT_S = 120.0
_TOOL_LIMIT_S = 30.0


def permall_framing(body: bytes) -> bytes:
    """``body`` framed as swtpm stores a plain libtpms TPM 2 permanent state: swtpm's
    version 2 header, one ``TAG_DATA`` record, libtpms' header and closing magic around it.

    For tests and benchmarks that need a permall of a chosen size or content (a canary,
    random bytes) which a host will write: it passes the host's plausibility check, as a
    real permall does, without manufacturing a TPM. swtpm itself would not load it.
    """
    state = LIBTPMS_HEADER.pack(4, PERSISTENT_ALL_MAGIC) + body + PERSISTENT_ALL_MAGIC.to_bytes(4)
    record = TLV_HEADER.pack(TAG_DATA, len(state)) + state
    total = SWTPM_HEADER.size + len(record)
    return SWTPM_HEADER.pack(2, 1, SWTPM_HEADER.size, 0, total) + record


def write_private_ca_config(config_dir: Path) -> Path:
    """Write a swtpm_setup config whose local CA keeps its keys under ``config_dir``.

    The default ``/etc/swtpm_setup.conf`` signs EK and platform certificates with the
    CA in ``/var/lib/swtpm-localca``, as libvirt does; that directory is writable only by
    root and ``tss``. Tests and unprivileged tools use this private CA instead. Returns
    the path to pass as ``config`` to :func:`manufacture_tpm_state`.
    """
    localca = shutil.which("swtpm_localca")
    if localca is None:
        raise SwtpmError("swtpm_localca not found on PATH (install swtpm-tools)")
    # swtpm_setup runs swtpm_localca from elsewhere; relative paths would dangle.
    config_dir = config_dir.absolute()
    ca_dir = config_dir / "localca"
    make_private_dir(ca_dir)
    localca_conf = config_dir / "swtpm-localca.conf"
    localca_options = config_dir / "swtpm-localca.options"
    setup_conf = config_dir / "swtpm_setup.conf"
    localca_conf.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir}/signkey.pem\n"
        f"issuercert = {ca_dir}/issuercert.pem\n"
        f"certserial = {ca_dir}/certserial\n",
        encoding="utf-8",
    )
    # The same platform description Debian's /etc/swtpm-localca.options carries.
    localca_options.write_text(
        "--platform-manufacturer Fedora\n--platform-version 2.1\n--platform-model QEMU\n",
        encoding="utf-8",
    )
    setup_conf.write_text(
        f"create_certs_tool = {localca}\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {localca_options}\n"
        "active_pcr_banks = sha256\n",
        encoding="utf-8",
    )
    return setup_conf


async def manufacture_tpm_state(
    state_dir: Path,
    *,
    overwrite: bool = False,
    config: Path | None = None,
    passphrase: bytes | None = None,
) -> None:
    """Manufacture a new TPM 2 in ``state_dir`` the way libvirt does for a new VM.

    Runs ``swtpm_setup --tpm2 --createek --create-ek-cert --create-platform-cert
    --lock-nvram``. ``state_dir`` (the ``tpm2`` directory) is created 0700 if missing.
    Existing state is an error unless ``overwrite`` is set. ``config`` replaces
    ``/etc/swtpm_setup.conf`` (see :func:`write_private_ca_config`). With ``passphrase``
    the state is encrypted with it from the start, as libvirt does for a TPM with
    ``<encryption secret>`` (``--pwdfile-fd`` on a pipe, ``--cipher aes-256-cbc``).
    """
    state_dir = state_dir.absolute()
    check_option_value(state_dir)
    if not state_dir.exists():
        make_private_dir(state_dir)
    argv = [
        "swtpm_setup",
        "--tpm2",
        "--tpmstate",
        str(state_dir),
        "--createek",
        "--create-ek-cert",
        "--create-platform-cert",
        "--lock-nvram",
    ]
    if overwrite:
        argv.append("--overwrite")
    if config is not None:
        argv += ["--config", str(config.absolute())]
    passphrase_fd = None if passphrase is None else passphrase_pipe(passphrase)
    if passphrase_fd is not None:
        # Not stdin: swtpm_setup does not read a passphrase from fd 0 reliably.
        argv += ["--pwdfile-fd", str(passphrase_fd), "--cipher", "aes-256-cbc"]
    started = time.monotonic()
    try:
        result = await run_tool(
            argv,
            limit_s=_SETUP_LIMIT_S,
            pass_fds=() if passphrase_fd is None else (passphrase_fd,),
        )
    finally:
        if passphrase_fd is not None:
            os.close(passphrase_fd)
    if result.returncode != 0:
        # swtpm_setup reports failures on stderr; its stdout is progress and public keys.
        raise SwtpmError(
            f"swtpm_setup failed for {state_dir} (exit {result.returncode}): "
            f"{tail_output(result.stderr or result.stdout)}"
        )
    if not (state_dir / PERMALL_NAME).is_file():
        raise SwtpmError(f"swtpm_setup succeeded but wrote no {PERMALL_NAME} in {state_dir}")
    _LOG.debug("manufactured TPM state in %s in %.2f s", state_dir, time.monotonic() - started)


def _check_nv_index(index: int) -> str:
    if not _NV_INDEX_MIN <= index <= _NV_INDEX_MAX:
        raise ValueError(f"NV index 0x{index:x} is outside 0x01000000-0x01ffffff")
    return f"0x{index:x}"


def _tpm2_env(tcti: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TPM2TOOLS_TCTI"] = tcti
    # The TSS logs whole command and response buffers at debug/trace level, NV data
    # included; an inherited TSS2_LOG must not put a secret into stderr.
    env["TSS2_LOG"] = "all+NONE"
    return env


async def nv_write_secret(tcti: str, index: int, secret: bytes) -> None:
    """Define an owner NV index of ``len(secret)`` bytes and write ``secret`` into it.

    Runs ``tpm2_nvdefine`` and ``tpm2_nvwrite`` against ``tcti``; the secret goes over
    stdin, never on a command line. The index must not exist yet.
    """
    handle = _check_nv_index(index)
    if not 1 <= len(secret) <= _NV_MAX_SIZE:
        raise ValueError(f"secret must be 1 to {_NV_MAX_SIZE} bytes, got {len(secret)}")
    env = _tpm2_env(tcti)
    define = await run_tool(
        [
            "tpm2_nvdefine",
            handle,
            "-C",
            "o",
            "-s",
            str(len(secret)),
            "-a",
            "ownerread|ownerwrite",
        ],
        env=env,
        limit_s=_TOOL_LIMIT_S,
    )
    if define.returncode != 0:
        raise SwtpmError(
            f"tpm2_nvdefine {handle} failed (exit {define.returncode}): "
            f"{tail_output(define.stderr)}"
        )
    write = await run_tool(
        ["tpm2_nvwrite", handle, "-C", "o", "-i", "-"], env=env, stdin=secret, limit_s=_TOOL_LIMIT_S
    )
    if write.returncode != 0:
        raise SwtpmError(
            f"tpm2_nvwrite {handle} failed (exit {write.returncode}): "
            f"{tail_output(write.stderr, secret=secret)}"
        )


async def nv_read_secret(tcti: str, index: int, size: int) -> bytes:
    """Read ``size`` bytes from owner NV index ``index`` through ``tcti``.

    Uses ``tpm2_nvread`` with its binary output on stdout (tpm2-tools 5.4 takes ``-o -``
    as a file named ``-``), so the secret never touches the disk.
    """
    handle = _check_nv_index(index)
    if not 1 <= size <= _NV_MAX_SIZE:
        raise ValueError(f"size must be 1 to {_NV_MAX_SIZE} bytes, got {size}")
    result = await run_tool(
        ["tpm2_nvread", handle, "-C", "o", "-s", str(size)],
        env=_tpm2_env(tcti),
        limit_s=_TOOL_LIMIT_S,
    )
    if result.returncode != 0:
        raise SwtpmError(
            f"tpm2_nvread {handle} failed (exit {result.returncode}): "
            f"{tail_output(result.stderr, secret=result.stdout)}"
        )
    if len(result.stdout) != size:
        raise SwtpmError(
            f"tpm2_nvread {handle} returned {len(result.stdout)} bytes, expected {size}"
        )
    return result.stdout
