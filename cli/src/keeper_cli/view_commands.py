"""The read-only commands: ``vm list``, ``vm show`` (and ``vm status``, which does both,
kept for scripts), ``vm history``, ``vm ek``, ``vm snapshots`` and ``hosts``. They change nothing,
so an interrupted or timed-out one leaves nothing behind. Registered in
:mod:`keeper_cli.app`."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from keeper_cli import inputs, output
from keeper_cli.config import CliSettings
from keeper_cli.errors import CliError, ExitCode
from keeper_cli.json_documents import FIELDS, document
from keeper_cli.options import JsonOption, TimeoutOption, VmArgument
from keeper_cli.running import RESOLVING, connected, resolve, run
from keeper_shared.keeper_client import views
from keeper_shared.messages.adoption import UnprotectedVmView
from keeper_shared.messages.types import StateKind

Found = tuple[list[views.VmStatus], list[UnprotectedVmView]]
"""Registered VMs and the TPM domains hosts reported that are not adopted."""


async def _everything(settings: CliSettings) -> Found:
    async with connected(settings, needs=RESOLVING) as client:
        return await views.vm_statuses(client), await client.list_unprotected()


async def _named(settings: CliSettings, vm: str) -> Found:
    """The registered VM ``vm`` names and the unprotected domains it names (exit 3 when
    it names neither)."""
    async with connected(settings, needs=RESOLVING) as client:
        unprotected = [item for item in await client.list_unprotected() if views.names(item, vm)]
        if unprotected and not await views.resolve_vm(client, vm):
            return [], unprotected
        one = await views.vm_status(client, await resolve(client, vm))
        return ([one] if one is not None else []), unprotected


def _documents(found: Found, now: float) -> list[dict[str, Any]]:
    vms, unprotected = found
    documents = [document("vm", item.as_json(now)) for item in vms]
    documents += [document("unprotected-vm", views.unprotected_json(item)) for item in unprotected]
    return sorted(documents, key=lambda doc: (doc["name"] or "", doc["vm_id"]))


def _ago(timestamp: float | None, now: float) -> str | None:
    return None if timestamp is None else f"{output.age(now - timestamp)} ago"


def _version(kind: views.KindStatus | None) -> str | None:
    return None if kind is None or kind.version is None else f"v{kind.version}"


def _tables(found: Found, now: float) -> None:
    vms, unprotected = found
    if not vms and not unprotected:
        output.stdout.print("No VMs yet: `keeper vm enable-tpm NAME --guest-os OS` registers one.")
        return
    if vms:
        # Column names are the JSON fields' (docs/cli-json.md): TPM and NVRAM are
        # state.tpm.version and state.nvram.version.
        output.table(
            None,
            [
                "NAME",
                "VM ID",
                "HOST",
                "EPOCH",
                "TPM",
                "TPM ENCRYPTED",
                "NVRAM",
                "NEWEST PERSISTED",
                "PROTECTION",
            ],
            [
                [
                    item.name,
                    item.vm_id,
                    item.host or "(not running)",
                    item.epoch,
                    _version(item.kinds.get("tpm")),
                    "yes" if item.tpm_encrypted else "no",
                    _version(item.kinds.get("nvram")),
                    _ago(item.newest_stored_at(), now),
                    item.protection(),
                ]
                for item in vms
            ],
        )
    if unprotected:
        output.table(
            "TPM domains not protected (`keeper vm adopt NAME` adopts one)",
            ["NAME", "VM ID", "HOST", "RUNNING", "REASONS"],
            [
                [
                    item.name,
                    item.vm_id,
                    item.host,
                    "yes" if item.running else "no",
                    "; ".join(item.reasons),
                ]
                for item in unprotected
            ],
        )


def list_vms(timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """Every VM: host, placement epoch, newest persisted state and its age, protection;
    and the TPM domains hosts reported that are not adopted, with the reasons."""
    found = run(_everything)
    if as_json:
        output.emit_json(_documents(found, time.time()))
        return
    _tables(found, time.time())


def _show_vm(item: views.VmStatus, now: float) -> None:
    rows: list[tuple[str, Any]] = [
        ("name", item.name),
        ("vm id", item.vm_id),
        ("guest os", item.guest_os),
        ("host", item.host or "(not running)"),
        ("epoch", item.epoch),
        ("protection", item.protection()),
    ]
    for kind in StateKind:
        status = item.kinds.get(kind.value)
        if status is None or status.version is None:
            rows.append((kind.value, "nothing stored"))
            continue
        rows.append(
            (
                kind.value,
                f"v{status.version}, {status.size} bytes, persisted {_ago(status.stored_at, now)}",
            )
        )
    rows += [
        ("tpm encrypted", "yes" if item.tpm_encrypted else "no"),
        ("last host", item.last_host),
        ("lost from", item.lost_from),
        ("tpm stranded", item.tpm_stranded),
    ]
    output.facts(rows)


def show(vm: VmArgument, timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """One VM in full: where it runs, its newest TPM and NVRAM versions and their age, its
    protection. A TPM domain that is not adopted shows with the reasons."""
    vms, unprotected = run(lambda settings: _named(settings, vm))
    now = time.time()
    if vms:
        if as_json:
            output.emit_json(document("vm", vms[0].as_json(now)))
            return
        _show_vm(vms[0], now)
        return
    if len(unprotected) > 1:
        hosts = ", ".join(item.host for item in unprotected)
        raise CliError(
            f"{len(unprotected)} hosts report a domain named {vm!r} ({hosts}): give its UUID",
            ExitCode.USAGE,
        )
    domain = unprotected[0]
    if as_json:
        output.emit_json(document("unprotected-vm", views.unprotected_json(domain)))
        return
    output.facts(
        [
            ("name", domain.name),
            ("vm id", domain.vm_id),
            ("host", domain.host),
            ("running", "yes" if domain.running else "no"),
            ("protection", views.NOT_ADOPTED),
            ("reasons", "; ".join(domain.reasons)),
        ]
    )


def status(
    vm: Annotated[
        str | None,
        typer.Argument(
            metavar="[VM]",
            callback=inputs.optional_vm_reference,
            help="One VM (id or name); all by default.",
        ),
    ] = None,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """The same as `list`, or `show VM` as a one-item list; kept for scripts written
    before those two."""
    found = run(_everything if vm is None else (lambda settings: _named(settings, vm)))
    if as_json:
        output.emit_json(_documents(found, time.time()))
        return
    _tables(found, time.time())


def endorsement_key(
    vm: VmArgument, timeout: TimeoutOption = None, as_json: JsonOption = False
) -> None:
    """The endorsement key of the VM's newest stored TPM: its public key (PEM) and its
    certificate when the TPM was made with one, for an attestation service. Public
    material only; the store reads it from a throwaway copy of the state."""

    async def work(settings: CliSettings) -> Any:
        async with connected(settings, needs=RESOLVING) as client:
            return await client.endorsement_key(await resolve(client, vm))

    reply = run(work)
    fields = {name: getattr(reply, name) for name in FIELDS["endorsement-key"]}
    if as_json:
        output.emit_json(document("endorsement-key", fields))
        return
    output.stdout.print(reply.public_key_pem, end="", highlight=False, markup=False)
    if reply.certificate_pem is not None:
        output.stdout.print(reply.certificate_pem, end="", highlight=False, markup=False)


def history(vm: VmArgument, timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """Every kept version of a VM's TPM and NVRAM state."""

    async def work(settings: CliSettings) -> Any:
        async with connected(settings, needs=RESOLVING) as client:
            return await client.state_history(await resolve(client, vm))

    reply = run(work)
    if as_json:
        output.emit_json(document("state-history", reply.model_dump(mode="json")))
        return
    rows = []
    for kind in reply.kinds:
        for item in reversed(kind.versions):
            rows.append(
                [
                    kind.kind.value,
                    f"v{item.version}" + (" (newest)" if item.version == kind.head_version else ""),
                    item.stored_at.astimezone().isoformat(timespec="seconds"),
                    item.size,
                    item.content_hash[:12],
                    item.origin.value,
                    item.host,
                    item.token.epoch,
                    ", ".join(item.snapshots) or None,
                    "ok" if item.flags.get("ok") is True else ("FAILED" if item.flags else None),
                ]
            )
    if not rows:
        output.stdout.print(f"No state stored yet for {vm}.")
        return
    output.table(
        f"{vm} ({reply.vm_id})",
        [
            "KIND",
            "VERSION",
            "STORED AT",
            "SIZE",
            "CONTENT HASH",
            "ORIGIN",
            "HOST",
            "EPOCH",
            "SNAPSHOTS",
            "FLAGS",
        ],
        rows,
    )


def snapshots(vm: VmArgument, timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """List a VM's snapshots."""

    async def work(settings: CliSettings) -> Any:
        async with connected(settings, needs=RESOLVING) as client:
            return await client.list_snapshots(await resolve(client, vm))

    found = run(work)
    if as_json:
        output.emit_json(
            [document("snapshot-info", item.model_dump(mode="json")) for item in found]
        )
        return
    output.table(
        None,
        ["SNAPSHOT ID", "CREATED AT", "TPM", "NVRAM"],
        [
            [
                item.snapshot_id,
                item.created_at.astimezone().isoformat(timespec="seconds"),
                *(f"v{item.versions[k]}" if k in item.versions else None for k in StateKind),
            ]
            for item in found
        ],
    )


def hosts(timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """Every host: alive, silent or lost, what it can run, and its TPM domains that are
    not protected."""

    async def work(settings: CliSettings) -> tuple[list[views.HostStatus], list[UnprotectedVmView]]:
        async with connected(settings, needs=("policy",)) as client:
            return await views.host_statuses(client), await client.list_unprotected()

    found, unprotected = run(work)
    now = time.time()
    by_host: dict[str, list[UnprotectedVmView]] = {}
    for domain in unprotected:
        by_host.setdefault(domain.host, []).append(domain)
    if as_json:
        output.emit_json(
            [
                document(
                    "host",
                    item.as_json(now)
                    | {
                        "unprotected": [
                            {"vm_id": d.vm_id, "name": d.name, "reasons": list(d.reasons)}
                            for d in by_host.get(item.host, [])
                        ]
                    },
                )
                for item in found
            ]
        )
        return
    if not found:
        output.stdout.print("No host has sent a heartbeat yet.")
        return
    output.table(
        None,
        [
            "HOST",
            "STATUS",
            "LAST SEEN AGE",
            "CLUSTER",
            "SWTPM VERSION",
            "LIBTPMS VERSION",
            "ARCHITECTURES",
            "UEFI FIRMWARE",
            "VMS",
            "UNPROTECTED",
        ],
        [
            [
                item.host,
                item.status,
                output.age(None if item.last_seen is None else now - item.last_seen),
                item.cluster,
                item.capabilities.get("swtpm_version"),
                item.capabilities.get("libtpms_version"),
                ",".join(item.capabilities.get("architectures") or []) or None,
                item.capabilities.get("uefi_firmware"),
                item.vms,
                ", ".join(d.name for d in by_host.get(item.host, [])) or None,
            ]
            for item in found
        ],
    )
