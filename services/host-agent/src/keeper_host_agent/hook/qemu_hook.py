#!/usr/bin/python3
"""vTPM Keeper's libvirt QEMU hook (installed as /etc/libvirt/hooks/qemu.d/vtpm-keeper by
``python -m keeper_host_agent install-hook``).

libvirt runs it as ``vtpm-keeper NAME OPERATION SUBOP EXTRA`` with the domain XML on stdin.
For a domain with an emulated TPM or a UEFI NVRAM it asks the host agent over its Unix
socket, with a bounded wait:

- ``prepare begin``: put the VM's newest stored TPM and NVRAM in place before libvirt would
  run ``swtpm_setup``. A refusal exits 1 with the agent's reason on stderr, which libvirt
  shows in the start's error. An agent that does not answer refuses the start too, unless
  the configuration says ``agent_unreachable = allow``.
- ``migrate begin``: an incoming live migration, never restored over.
- ``release end``: hand the final state to the agent while the files still exist; never
  fails a stop, and waits at most ``stop_timeout_s``.

Standard library only, no import of vTPM Keeper, and never a call to libvirt (libvirt holds
the domain while the hook runs: a call back would wait for ever). Prints nothing on stdout:
for ``migrate begin`` libvirt would take it as a new domain XML.
"""

from __future__ import annotations

import json
import socket
import sys
import xml.etree.ElementTree as ET
from typing import IO

PROTOCOL_VERSION = 1
CONFIG_PATH = "/etc/vtpm-keeper/qemu-hook.conf"
DEFAULTS = {
    "socket": "/run/keeper/host-agent.sock",
    "prepare_timeout_s": "40",
    "stop_timeout_s": "15",
    "agent_unreachable": "refuse",
}
PHASES = {
    ("prepare", "begin"): "prepare",
    ("migrate", "begin"): "migrate-in",
    ("release", "end"): "release",
}
MAX_XML_BYTES = 256 * 1024
MAX_REPLY_BYTES = 64 * 1024


def read_config(path: str = CONFIG_PATH) -> dict[str, str]:
    """``key = value`` lines over the defaults; a missing file keeps the defaults."""
    config = dict(DEFAULTS)
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                key, sep, value = line.partition("=")
                if sep and not key.strip().startswith("#"):
                    config[key.strip()] = value.strip()
    except FileNotFoundError:
        pass
    return config


def keeps_state(xml: str) -> bool:
    """Whether the domain has an emulated TPM or a UEFI NVRAM (what the keeper protects)."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    except ET.ParseError:
        return True  # let the agent say what is wrong with it
    backend = root.find("devices/tpm/backend")
    if backend is not None and backend.get("type") == "emulator":
        return True
    os_element = root.find("os")
    loader = root.find("os/loader")
    return (
        root.find("os/nvram") is not None
        or (os_element is not None and os_element.get("firmware") == "efi")
        or (loader is not None and loader.get("type") == "pflash")
    )


def ask(path: str, request: dict[str, object], timeout_s: float) -> dict[str, object]:
    """One request line, one reply line; raises OSError, TimeoutError or ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout_s)
        connection.connect(path)
        connection.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n") and len(reply) <= MAX_REPLY_BYTES:
            chunk = connection.recv(4096)
            if not chunk:
                break
            reply += chunk
    data = json.loads(reply)
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ValueError("the agent's reply is not a hook reply")
    return data


def run(argv: list[str], stdin: IO[str], stderr: IO[str], config: dict[str, str]) -> int:
    """The hook's exit code for one call."""
    if len(argv) < 4:
        return 0
    name, operation, subop = argv[1], argv[2], argv[3]
    # Read whatever the call is: libvirt writes the XML to every hook.
    xml = stdin.read(MAX_XML_BYTES + 1)
    phase = PHASES.get((operation, subop))
    if phase is None:
        return 0
    if not keeps_state(xml):
        return 0
    starting = phase != "release"
    timeout_s = float(config["prepare_timeout_s" if starting else "stop_timeout_s"])
    request = {"v": PROTOCOL_VERSION, "phase": phase, "name": name, "xml": xml}
    try:
        reply = ask(config["socket"], request, timeout_s)
    except (OSError, ValueError) as error:  # TimeoutError is an OSError
        reason = f"host agent unreachable at {config['socket']} ({type(error).__name__}: {error})"
        if not starting:
            stderr.write(f"vTPM Keeper: final state of {name} not handed over: {reason}\n")
            return 0
        if config["agent_unreachable"] == "allow":
            stderr.write(f"vTPM Keeper: {name} started unprotected: {reason}\n")
            return 0
        stderr.write(f"vTPM Keeper refused to start {name}: {reason}\n")
        return 1
    if reply["ok"] or not starting:
        return 0
    stderr.write(f"{reply.get('message') or 'vTPM Keeper refused the start'}\n")
    return 1


def main() -> None:
    """Entry point when libvirt runs the hook."""
    sys.exit(run(sys.argv, sys.stdin, sys.stderr, read_config()))


if __name__ == "__main__":
    main()
