"""The hook libvirt runs (``keeper_host_agent/hook/qemu_hook.py``), with the socket call
replaced: which calls it forwards, and its exit code and stderr for each answer."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from keeper_host_agent.hook import qemu_hook

TPM_DOMAIN = (
    "<domain><name>vm1</name><uuid>6c1f0e9a-0d0a-4b8e-9a57-1d2c3b4a5f60</uuid>"
    "<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>"
    "</domain>"
)
UEFI_DOMAIN = "<domain><name>vm2</name><os firmware='efi'><type>hvm</type></os></domain>"
PLAIN_DOMAIN = "<domain><name>vm3</name><os><type>hvm</type></os><devices/></domain>"


class Asked:
    def __init__(self, reply: dict[str, object] | Exception) -> None:
        self.reply = reply
        self.requests: list[tuple[dict[str, object], float]] = []

    def __call__(
        self, path: str, request: dict[str, object], timeout_s: float
    ) -> dict[str, object]:
        self.requests.append((request, timeout_s))
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def run(
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    xml: str,
    reply: dict[str, object] | Exception,
    **config: str,
) -> tuple[int, str, Asked]:
    asked = Asked(reply)
    monkeypatch.setattr(qemu_hook, "ask", asked)
    stderr = io.StringIO()
    code = qemu_hook.run(
        ["vtpm-keeper", *args], io.StringIO(xml), stderr, {**qemu_hook.DEFAULTS, **config}
    )
    return code, stderr.getvalue(), asked


@pytest.mark.parametrize(
    "args", [["vm1", "start", "begin", "-"], ["vm1", "stopped", "end", "-"], ["vm1"]]
)
def test_other_calls_are_not_forwarded(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    code, _, asked = run(monkeypatch, args, TPM_DOMAIN, {"ok": False})
    assert code == 0
    assert asked.requests == []


def test_a_domain_without_tpm_or_nvram_never_waits_for_the_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, asked = run(
        monkeypatch, ["vm3", "prepare", "begin", "-"], PLAIN_DOMAIN, OSError("down")
    )
    assert code == 0
    assert asked.requests == []


@pytest.mark.parametrize(
    ("args", "phase"),
    [
        (["vm1", "prepare", "begin", "-"], "prepare"),
        (["vm1", "migrate", "begin", "-"], "migrate-in"),
        (["vm1", "release", "end", "-"], "release"),
    ],
)
def test_the_phases_it_acts_on_are_forwarded_with_the_xml(
    monkeypatch: pytest.MonkeyPatch, args: list[str], phase: str
) -> None:
    code, _, asked = run(monkeypatch, args, TPM_DOMAIN, {"ok": True})
    assert code == 0
    [(request, timeout_s)] = asked.requests
    assert request == {"v": 1, "phase": phase, "name": "vm1", "xml": TPM_DOMAIN}
    expected = qemu_hook.DEFAULTS["stop_timeout_s" if phase == "release" else "prepare_timeout_s"]
    assert timeout_s == float(expected)


def test_a_refused_prepare_exits_1_with_the_agents_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = "vTPM Keeper refused to start vm2: the state store did not answer"
    code, stderr, _ = run(
        monkeypatch, ["vm2", "prepare", "begin", "-"], UEFI_DOMAIN, {"ok": False, "message": reason}
    )
    assert code == 1
    assert stderr == reason + "\n"


def test_an_unreachable_agent_refuses_the_start_unless_configured_to_allow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["vm1", "prepare", "begin", "-"]
    code, stderr, _ = run(monkeypatch, args, TPM_DOMAIN, ConnectionRefusedError("refused"))
    assert code == 1
    assert "vTPM Keeper refused to start vm1: host agent unreachable" in stderr
    code, stderr, _ = run(
        monkeypatch, args, TPM_DOMAIN, TimeoutError("timed out"), agent_unreachable="allow"
    )
    assert code == 0
    assert "started unprotected" in stderr


def test_a_stop_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["vm1", "release", "end", "-"]
    assert run(monkeypatch, args, TPM_DOMAIN, {"ok": False, "message": "x"})[0] == 0
    code, stderr, _ = run(monkeypatch, args, TPM_DOMAIN, TimeoutError("timed out"))
    assert code == 0
    assert "final state of vm1 not handed over" in stderr


def test_the_configuration_file_overrides_the_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "qemu-hook.conf"
    conf.write_text("# comment\nsocket = /run/other.sock\nagent_unreachable=allow\nnonsense\n")
    config = qemu_hook.read_config(str(conf))
    assert config["socket"] == "/run/other.sock"
    assert config["agent_unreachable"] == "allow"
    assert config["prepare_timeout_s"] == qemu_hook.DEFAULTS["prepare_timeout_s"]
    assert qemu_hook.read_config(str(tmp_path / "missing")) == qemu_hook.DEFAULTS
