"""``keeper``: vTPM Keeper for people and automation.

Every command talks to policy and the state store over RabbitMQ (``--amqp-url``, else
``KEEPER_AMQP_URL``, by default the local stack of ``make demo``); lists, shows and VM
names are their answers to queries, so the CLI needs no access to their storage. Human
tables by default, ``--json`` for scripts (:mod:`keeper_cli.json_documents`); exit codes
are listed in :class:`~keeper_cli.errors.ExitCode` and in ``keeper --help``.

This module holds the root command, its global options, and the ``vm`` commands that
change something; the read-only ones are in :mod:`keeper_cli.view_commands`.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from keeper_cli import inputs, output, template_commands, view_commands
from keeper_cli.command_group import KeeperGroup
from keeper_cli.config import CliSettings
from keeper_cli.errors import CliError, ExitCode
from keeper_cli.json_documents import JSON_SCHEMA_VERSION, document
from keeper_cli.options import (
    AllowDuplicateNameOption,
    HostOption,
    JsonOption,
    OverrideGuestOsOption,
    OverrideOption,
    ReasonOption,
    TimeoutOption,
    VmArgument,
    VmsArgument,
    YesOption,
)
from keeper_cli.prompts import PASSPHRASE_VARIABLE, confirm, passphrase, progress
from keeper_cli.running import RESOLVING, GlobalOptions, connected, resolve, run
from keeper_shared.bus.client import CallError
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.client import KeeperClient, KeeperRequestError
from keeper_shared.keeper_client.loss import describe_loss
from keeper_shared.messages.adoption import AdoptVm, VmAdoptionResult
from keeper_shared.messages.envelope import MessageError
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.replies import (
    AcceptTpmReply,
    DeleteStateReply,
    DeleteVmSnapshotReply,
    DisableTpmReply,
    PlaceVmReply,
    RevertVmReply,
)
from keeper_shared.messages.tpm import Firmware, VmSpec
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import StateKind


def _environment_and_exit_codes() -> str:
    """The root help's epilog: what scripts need beyond the options."""
    codes = "\n".join(f"  {int(code):>3}  {code.meaning}" for code in ExitCode)
    return (
        "\b\nEnvironment (options given on the command line win):\n"
        "  KEEPER_AMQP_URL           RabbitMQ URL (default: the local stack, port 28672)\n"
        "  KEEPER_AMQP_URLS          a cluster's node URLs, comma-separated\n"
        "  KEEPER_TIMEOUT_S          default of --timeout (120)\n"
        f"  {PASSPHRASE_VARIABLE}  bundle passphrase of export and import\n"
        "  KEEPER_LOG_LEVEL          library log level on stderr (WARNING)\n"
        f"\n\b\nExit codes:\n{codes}\n"
        f"\n--json prints documents of JSON schema version {JSON_SCHEMA_VERSION} "
        "(docs/cli-json.md)."
    )


HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

app = typer.Typer(
    name="keeper",
    cls=KeeperGroup,
    help="vTPM Keeper: keep every VM's TPM and UEFI NVRAM state safe off its host.",
    epilog=_environment_and_exit_codes(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
)
vm_app = typer.Typer(
    help="Enable, create, start, stop, list, snapshot, restore, clone, move VMs.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
)
app.add_typer(vm_app, name="vm")
app.add_typer(template_commands.template_app, name="template")


def keeper_version() -> str:
    """The installed keeper-cli version."""
    try:
        return version("keeper-cli")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"keeper {keeper_version()} (JSON schema v{JSON_SCHEMA_VERSION})")
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    amqp_url: Annotated[
        list[str] | None,
        typer.Option(
            "--amqp-url",
            metavar="URL",
            help="RabbitMQ to talk through, amqp[s]://USER:PASSWORD@HOST:PORT/; once per node "
            "of a cluster (default: KEEPER_AMQP_URL or KEEPER_AMQP_URLS, else the local stack).",
        ),
    ] = None,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print keeper's version and its JSON schema version, and exit.",
        ),
    ] = False,
) -> None:
    """vTPM Keeper: keep every VM's TPM and UEFI NVRAM state safe off its host."""
    ctx.obj = GlobalOptions(amqp_urls=tuple(amqp_url or ()))


def _follow(vm: str) -> str:
    return f"`keeper vm show {vm}`"


# --- vm: register, start, stop ----------------------------------------------------------

_SPEC_OPTIONS = {
    "vm_id": "--vm-id",
    "name": "NAME",
    "arch": "--arch",
    "machine": "--machine",
    "firmware": "--firmware",
    "memory_mib": "--memory-mib",
    "guest_os": "--guest-os",
}


@vm_app.command("enable-tpm")
def enable_tpm(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", callback=inputs.domain_name, help="libvirt domain name."),
    ],
    guest_os: Annotated[
        str, typer.Option(metavar="OS", help="Guest OS, e.g. windows-11, rhel-9.2, win2k22.")
    ],
    vm_id: Annotated[
        str | None,
        typer.Option(
            metavar="UUID", callback=inputs.vm_id, help="The VM's UUID (a new one by default)."
        ),
    ] = None,
    arch: Annotated[str, typer.Option(metavar="ARCH", help="Guest architecture.")] = "x86_64",
    machine: Annotated[str, typer.Option(metavar="TYPE", help="Machine type.")] = "q35",
    firmware: Annotated[Firmware, typer.Option(help="Boot firmware.")] = Firmware.UEFI,
    memory_mib: Annotated[
        int, typer.Option(metavar="MIB", min=16, max=4 * 1024 * 1024, help="Guest RAM in MiB.")
    ] = 256,
    secure_boot: Annotated[bool, typer.Option("--secure-boot", help="UEFI Secure Boot.")] = False,
    encrypt_state: Annotated[
        bool,
        typer.Option(
            "--encrypt-state",
            help="Encrypt the TPM state with a per-VM libvirt secret the keeper creates and "
            "keeps (needs hosts whose libvirt has a secret driver, as qemu:///system does).",
        ),
    ] = False,
    override: OverrideOption = False,
    override_guest_os: OverrideGuestOsOption = False,
    allow_duplicate_name: AllowDuplicateNameOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask policy to approve a TPM for a VM and register it. A name another VM has is
    refused unless --allow-duplicate-name."""
    try:
        spec = VmSpec(
            vm_id=vm_id or str(uuid.uuid4()),
            name=name,
            arch=arch,
            machine=machine,
            firmware=firmware,
            memory_mib=memory_mib,
            guest_os=guest_os,
            secure_boot=secure_boot,
            encrypt_tpm_state=encrypt_state,
        )
    except ValidationError as error:
        raise inputs.model_error(error, _SPEC_OPTIONS) from None

    async def work(settings: CliSettings) -> str:
        async with connected(settings, needs=("policy",)) as client:
            with progress(f"Asking policy about {name}...", quiet=as_json):
                xml: str = await client.enable_tpm(
                    spec,
                    override=override,
                    override_guest_os=override_guest_os,
                    allow_duplicate_name=allow_duplicate_name,
                )
                return xml

    tpm_xml = run(work, follow=_follow(spec.vm_id))
    if as_json:
        output.emit_json(
            document(
                "tpm-approval",
                {
                    "vm_id": spec.vm_id,
                    "name": name,
                    "approved": True,
                    "tpm_xml": tpm_xml,
                    "encrypt_state": encrypt_state,
                },
            )
        )
        return
    output.facts(
        [
            ("approved", name),
            ("vm id", spec.vm_id),
            ("tpm", tpm_xml),
            ("state encrypted", "yes" if encrypt_state else "no"),
        ]
    )


@vm_app.command("start")
def start(
    vm: VmArgument,
    host: HostOption,
    domain_xml_file: Annotated[
        Path | None,
        typer.Option(
            "--domain-xml",
            metavar="FILE",
            callback=inputs.domain_xml_file,
            help="Your own libvirt domain XML (virsh dumpxml, virt-install --print-xml): "
            "policy checks it against the VM's approval, adds the TPM and NVRAM it needs, "
            "keeps the rest as written, and uses it for later starts too.",
        ),
    ] = None,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a VM on a host with its newest stored TPM and NVRAM state."""
    domain_xml = inputs.domain_xml_text(domain_xml_file) if domain_xml_file is not None else None

    async def work(settings: CliSettings) -> tuple[str, int]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            with progress(f"Starting {vm} on {host}...", quiet=as_json):
                return vm_id, int(await client.start(vm_id, host, domain_xml=domain_xml))

    vm_id, epoch = run(work, follow=_follow(vm))
    if as_json:
        output.emit_json(
            document("vm-start", {"vm_id": vm_id, "host": host, "epoch": epoch, "started": True})
        )
        return
    output.facts([("started", vm), ("vm id", vm_id), ("host", host), ("placement epoch", epoch)])


StopOutcome = tuple[str, str, bool | None, str | None]
"""A stop's VM reference, VM id, whether its final state was retrieved, and the error."""

STOP_CONCURRENCY = 4
"""Stops sent to policy at once; each waits for its guest, so a few overlap well."""


class NotRunningError(CliError):
    """The VM runs nowhere: there is nothing to stop."""

    def __init__(self, reference: str) -> None:
        super().__init__(f"{reference} is not running", ExitCode.REFUSED)


async def _stop_one(
    client: KeeperClient, reference: str, vm_id: str, mode: StopMode, *, alone: bool
) -> StopOutcome:
    """Stop one VM that runs; with others (not ``alone``) a failure is its outcome."""
    try:
        found = await views.vm_status(client, vm_id)
        if found is None or found.host is None:
            raise NotRunningError(reference)
        return reference, vm_id, bool(await client.stop(vm_id, mode)), None
    except (KeeperRequestError, CallError, MessageError, NotRunningError) as error:
        if alone:
            raise
        return reference, vm_id, None, str(error)


def _stop(vms: list[str], mode: StopMode, as_json: bool) -> None:
    verb = "Shutting down" if mode is StopMode.SHUTDOWN else "Powering off"

    async def work(settings: CliSettings) -> list[StopOutcome]:
        gate = asyncio.Semaphore(STOP_CONCURRENCY)
        async with connected(settings, needs=RESOLVING) as client:
            vm_ids = [await resolve(client, reference) for reference in vms]
            what = vms[0] if len(vms) == 1 else f"{len(vms)} VMs"
            message = f"{verb} {what} (retrieving the final state first)..."
            with progress(message, quiet=as_json, total=len(vms)) as one_done:

                async def gated(reference: str, vm_id: str) -> StopOutcome:
                    async with gate:
                        outcome = await _stop_one(
                            client, reference, vm_id, mode, alone=len(vms) == 1
                        )
                    one_done()
                    return outcome

                return list(await asyncio.gather(*map(gated, vms, vm_ids)))

    outcomes = run(work, follow="`keeper vm list`" if len(vms) > 1 else _follow(vms[0]))
    failed = [item for item in outcomes if item[3] is not None]
    if as_json:
        documents = [
            document(
                "vm-stop",
                {
                    "vm_id": vm_id,
                    "mode": mode.value,
                    "stopped": error is None,
                    "retrieved": retrieved,
                    "error": error,
                },
            )
            for _, vm_id, retrieved, error in outcomes
        ]
        output.emit_json(documents[0] if len(vms) == 1 else documents)
    elif len(vms) == 1:
        reference, vm_id, retrieved, _ = outcomes[0]
        output.facts(
            [("stopped", reference), ("vm id", vm_id), ("final state retrieved", retrieved)]
        )
    else:
        output.table(
            None,
            ["VM", "VM ID", "STOPPED", "RETRIEVED", "ERROR"],
            [
                [ref, vm_id, error is None, retrieved, error]
                for ref, vm_id, retrieved, error in outcomes
            ],
        )
    if any(retrieved is False for _, _, retrieved, _ in outcomes):
        output.warning(
            "a final state could not be retrieved; the newest stored version is what a "
            "restart gets (see `keeper vm show VM`)."
        )
    if failed:
        raise typer.Exit(int(ExitCode.REFUSED))


@vm_app.command("shutdown")
def shutdown(vms: VmsArgument, timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """Shut running VMs down (guest shutdown), keeping their final state, and remove them
    from their hosts. With several VMs: one JSON object each, in a list."""
    _stop(vms, StopMode.SHUTDOWN, as_json)


@vm_app.command("poweroff")
def poweroff(vms: VmsArgument, timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """Power running VMs off, keeping their final state (retrieved while they still run).
    With several VMs: one JSON object each, in a list."""
    _stop(vms, StopMode.POWEROFF, as_json)


@vm_app.command("adopt")
def adopt(
    vm: VmArgument,
    host: Annotated[
        str | None,
        typer.Option(
            metavar="HOST",
            callback=inputs.host_id,
            help="The host it is on, when several report that name.",
        ),
    ] = None,
    guest_os: Annotated[
        str | None,
        typer.Option(
            metavar="OS",
            help="Guest OS, when the domain's metadata names none (e.g. windows-11).",
        ),
    ] = None,
    override: Annotated[
        bool,
        typer.Option(
            "--override", help="Adopt although the cluster's hosts do not all report swtpm."
        ),
    ] = False,
    override_guest_os: Annotated[
        bool,
        typer.Option(
            "--override-guest-os", help="Adopt although the guest-OS rules do not allow a TPM."
        ),
    ] = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Protect a TPM domain a host reported that vTPM Keeper did not define: registered
    from its XML and placed where it runs, never redefined or restarted. The approval
    rules still apply; the host's adoption mode does not."""
    try:
        request = AdoptVm(
            vm=vm,
            host=host,
            guest_os=guest_os,
            override=override,
            override_guest_os=override_guest_os,
        )
    except ValidationError as error:
        raise inputs.model_error(
            error, {"vm": "VM", "host": "--host", "guest_os": "--guest-os"}
        ) from None

    async def work(settings: CliSettings) -> VmAdoptionResult:
        async with connected(settings, needs=("policy",)) as client:
            with progress(f"Adopting {vm}...", quiet=as_json):
                result: VmAdoptionResult = await client.adopt(request)
                return result

    result = run(work, follow=_follow(vm))
    if not result.adopted:
        code = ExitCode.UNKNOWN_VM if result.vm_id is None else ExitCode.REFUSED
        output.failure("; ".join(result.reasons), code, as_json=as_json)
        raise typer.Exit(int(code))
    if as_json:
        output.emit_json(document("adoption", result.model_dump(mode="json")))
        return
    rows: list[tuple[str, Any]] = [
        ("adopted", result.name or vm),
        ("vm id", result.vm_id),
        ("host", result.host),
        ("placement epoch", result.epoch),
    ]
    if result.overridden:
        rows.append(("overridden", "; ".join(result.overridden)))
    output.facts(rows)


# --- vm: stored state -------------------------------------------------------------------


async def _refuse_while_running(client: KeeperClient, vm: str, vm_id: str, then: str) -> None:
    """End the command when the VM runs: ``then`` is what to do after the shutdown."""
    found = await views.vm_status(client, vm_id)
    if found is not None and found.host is not None:
        raise CliError(
            f"{vm} runs on {found.host}: shut it down first (`keeper vm shutdown {vm}`), "
            f"then {then}",
            ExitCode.REFUSED,
        )


@vm_app.command("restore")
def restore(
    vm: VmArgument,
    host: Annotated[
        str,
        typer.Option(
            metavar="HOST",
            callback=inputs.host_id,
            help="Host to start the VM on with the restored state.",
        ),
    ],
    state_version: Annotated[
        int | None,
        typer.Option("--version", metavar="N", min=1, help="The stored version to restore."),
    ] = None,
    kind: Annotated[
        list[StateKind] | None, typer.Option(help="Which state (default: both kinds).")
    ] = None,
    snapshot: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", callback=inputs.snapshot_id, help="Restore a snapshot instead."
        ),
    ] = None,
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a stopped VM with an older version (or a snapshot) of its state. Says what
    stops being the newest and asks first (--yes for automation)."""
    if (state_version is None) == (snapshot is None):
        raise inputs.usage("give exactly one of --version or --snapshot")
    if snapshot is not None and kind:
        raise inputs.usage("--kind goes with --version: a snapshot restores what it pinned")
    kinds = kind or list(StateKind)

    async def work(settings: CliSettings) -> tuple[str, PlaceVmReply]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            await _refuse_while_running(client, vm, vm_id, "restore")
            reply = await client.state_history(vm_id)
            heads = {item.kind: item.head_version for item in reply.kinds}
            if state_version is not None:
                newer = [
                    f"{k.value} v{state_version + 1}..v{heads[k]}"
                    for k in kinds
                    if heads.get(k) is not None and heads[k] > state_version
                ]
                what = f"version {state_version} of {', '.join(k.value for k in kinds)}"
            else:
                found = [s for s in await client.list_snapshots(vm_id) if s.snapshot_id == snapshot]
                if not found:
                    raise CliError(f"{vm} has no snapshot {snapshot!r}", ExitCode.REFUSED)
                pinned = found[0].versions
                newer = [
                    f"{k.value} v{pinned[k] + 1}..v{v}"
                    for k, v in heads.items()
                    if v is not None and k in pinned and v > pinned[k]
                ]
                what = f"snapshot {snapshot}"
            loses = (
                f"the newer state ({'; '.join(newer)}) stops being the newest and the guest "
                "loses whatever it sealed since"
                if newer
                else "nothing newer is stored"
            )
            confirm(f"{vm} will start on {host} with {what}; {loses}. Continue?", yes=yes)
            with progress(f"Restoring {vm} on {host}...", quiet=as_json):
                placed = await client.place(
                    vm_id,
                    host,
                    versions=dict.fromkeys(kinds, state_version)
                    if state_version is not None
                    else None,
                    snapshot_id=snapshot,
                    allow_older=True,
                )
            if placed.already_placed:
                raise CliError(
                    f"{vm} already runs on {host}: nothing was restored. Shut it down first "
                    f"(`keeper vm shutdown {vm}`), then restore.",
                    ExitCode.REFUSED,
                )
            return vm_id, placed

    vm_id, placed = run(work, follow=_follow(vm))
    versions = {kind.value: version for kind, version in sorted(placed.versions.items())}
    if as_json:
        output.emit_json(
            document(
                "vm-restore",
                {
                    "vm_id": vm_id,
                    "host": host,
                    "restored": True,
                    "epoch": placed.epoch,
                    "versions": versions,
                },
            )
        )
        return
    output.facts(
        [
            ("restored", vm),
            ("vm id", vm_id),
            ("host", host),
            ("epoch", placed.epoch),
            *((f"{kind} version", version) for kind, version in versions.items()),
        ]
    )


@vm_app.command("snapshot")
def snapshot(
    vm: VmArgument,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="NAME",
            callback=inputs.snapshot_id,
            help="Snapshot name (default: a timestamp).",
        ),
    ] = None,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory",
            help="Include the running VM's memory: it is paused while its TPM and NVRAM are "
            "retrieved and pinned, so `keeper vm revert` brings back both together.",
        ),
    ] = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pin the VM's newest stored TPM and NVRAM versions under a snapshot name (with
    --memory: a libvirt snapshot of the running VM with the TPM and NVRAM it had then)."""
    snapshot_id = name or time.strftime("snap-%Y%m%d-%H%M%S")

    async def work(settings: CliSettings) -> tuple[str, dict[StateKind, int]]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            if not memory:
                return vm_id, await client.create_snapshot(vm_id, snapshot_id)
            status = await views.vm_status(client, vm_id)
            if status is None or status.host is None:
                raise CliError(
                    f"{vm} is not running: there is no memory to snapshot (without --memory "
                    "its stored state is pinned)",
                    ExitCode.REFUSED,
                )
            with progress(f"Snapshotting {vm} with its memory...", quiet=as_json):
                detail = await client.snapshot(vm_id, snapshot_id, memory=True)
            return vm_id, {k: int(detail[k.value]) for k in StateKind if k.value in detail}

    vm_id, pinned = run(work, follow=f"`keeper vm snapshots {vm}`")
    versions = {k.value: v for k, v in pinned.items()}
    if as_json:
        output.emit_json(
            document(
                "snapshot",
                {
                    "vm_id": vm_id,
                    "snapshot_id": snapshot_id,
                    "versions": versions,
                    "memory": memory,
                },
            )
        )
        return
    rows: list[tuple[str, Any]] = [("snapshot", snapshot_id), ("vm id", vm_id)]
    if memory:
        rows.append(("memory", f"kept; `keeper vm revert {vm} {snapshot_id}` goes back to it"))
    output.facts([*rows, *((k, f"v{v}") for k, v in versions.items())])


@vm_app.command("revert")
def revert(
    vm: VmArgument,
    snapshot_id: Annotated[
        str,
        typer.Argument(
            metavar="SNAPSHOT",
            callback=inputs.snapshot_id,
            help="A snapshot taken with --memory.",
        ),
    ],
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Go back to a snapshot with memory: the VM runs on from that moment with the TPM and
    NVRAM it had then. A running VM is powered off first (its final state is kept in the
    history). Says what stops being the newest and asks first (--yes for automation)."""

    async def work(settings: CliSettings) -> tuple[str, RevertVmReply]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            found = [s for s in await client.list_snapshots(vm_id) if s.snapshot_id == snapshot_id]
            if not found:
                raise CliError(f"{vm} has no snapshot {snapshot_id!r}", ExitCode.REFUSED)
            status = await views.vm_status(client, vm_id)
            running = status is not None and status.host is not None
            lost = (
                f"{vm} runs: it is powered off at once (no shutdown), and what its guest did "
                "since the snapshot, in memory and on the TPM, is left behind"
                if running
                else "what the guest did since the snapshot is left behind"
            )
            confirm(
                f"Revert {vm} to snapshot {snapshot_id}? {lost}; the stored TPM and NVRAM "
                "stay in the history. Continue?",
                yes=yes,
            )
            with progress(f"Reverting {vm} to {snapshot_id}...", quiet=as_json):
                return vm_id, await client.revert(vm_id, snapshot_id)

    vm_id, reverted = run(work, follow=_follow(vm))
    versions = {kind.value: version for kind, version in sorted(reverted.versions.items())}
    if as_json:
        output.emit_json(
            document(
                "vm-revert",
                {
                    "vm_id": vm_id,
                    "snapshot_id": snapshot_id,
                    "host": reverted.host,
                    "epoch": reverted.epoch,
                    "versions": versions,
                },
            )
        )
        return
    output.facts(
        [
            ("reverted", vm),
            ("snapshot", snapshot_id),
            ("vm id", vm_id),
            ("host", reverted.host),
            ("epoch", reverted.epoch),
            *((f"{kind} version", version) for kind, version in versions.items()),
        ]
    )


@vm_app.command("snapshot-delete")
def snapshot_delete(
    vm: VmArgument,
    snapshot_id: Annotated[
        str,
        typer.Argument(
            metavar="SNAPSHOT", callback=inputs.snapshot_id, help="The snapshot to delete."
        ),
    ],
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a snapshot (versions only it kept are deleted with it; a snapshot with memory
    loses its memory file on its host). Asks first (--yes for automation)."""

    async def work(settings: CliSettings) -> tuple[str, DeleteVmSnapshotReply]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            confirm(
                f"Delete snapshot {snapshot_id} of {vm}? TPM and NVRAM versions that only this "
                "snapshot keeps, and its memory, are deleted and cannot be restored afterwards.",
                yes=yes,
            )
            return vm_id, await client.delete_snapshot(vm_id, snapshot_id)

    vm_id, reply = run(work, follow=f"`keeper vm snapshots {vm}`")
    if as_json:
        output.emit_json(
            document(
                "snapshot-deletion",
                {
                    "vm_id": vm_id,
                    "snapshot_id": snapshot_id,
                    "deleted": reply.deleted,
                    "memory_deleted_on": reply.memory_deleted_on,
                    "memory_left_on": reply.memory_left_on,
                },
            )
        )
        return
    output.stdout.print(
        f"snapshot {snapshot_id}: {'deleted' if reply.deleted else 'there was none'}"
    )
    if reply.memory_deleted_on is not None:
        output.stdout.print(f"its memory was deleted on {reply.memory_deleted_on}")
    if reply.memory_left_on is not None:
        output.stderr.print(
            f"its memory file is still on {reply.memory_left_on} (declared lost): remove "
            f"<snapshot_dir>/{vm_id}/{snapshot_id}.mem there before the host rejoins"
        )


def _delete(vm: str, *, disable: bool, reason: str, yes: bool, as_json: bool) -> None:
    """``delete-state`` and ``disable-tpm``: say what is lost, confirm, delete."""

    async def work(settings: CliSettings) -> tuple[str, DeleteStateReply | DisableTpmReply]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            await _refuse_while_running(
                client, vm, vm_id, "disable its TPM" if disable else "delete its state"
            )
            lost = describe_loss(
                await client.state_history(vm_id), await client.list_snapshots(vm_id)
            )
            action = f"Disable the TPM of {vm}" if disable else f"Delete the stored state of {vm}"
            if lost:
                listed = "".join(f"\n  - {line}" for line in lost)
                confirm(f"{action}? This deletes for good:{listed}\nContinue?", yes=yes)
            elif disable:
                confirm(f"{action}? It has no stored state; it is no longer registered.", yes=yes)
            with progress(f"{action}...", quiet=as_json):
                if disable:
                    return vm_id, await client.disable_tpm(vm_id, reason=reason)
                return vm_id, await client.delete_state(vm_id, reason=reason)

    vm_id, reply = run(work, follow=_follow(vm))
    deleted = {
        **{f"{kind.value}_versions": reply.deleted_versions.get(kind, 0) for kind in StateKind},
        "snapshots": reply.deleted_snapshots,
    }
    if as_json:
        output.emit_json(
            document(
                "state-deletion", {"vm_id": vm_id, "tpm_disabled": disable, "deleted": deleted}
            )
        )
        return
    output.facts(
        [
            ("tpm disabled" if disable else "state deleted", vm),
            ("vm id", vm_id),
            *((name.replace("_", " "), count) for name, count in sorted(deleted.items())),
        ]
    )


@vm_app.command("accept-tpm")
def accept_tpm(
    vm: VmArgument,
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Accept the VM's newest stored TPM as its own, after it was flagged as replaced
    unasked (status: tpm-reset). From then on restores hand out the newest version again;
    the versions of the old TPM stay in the history. Asks first (--yes for automation)."""

    async def work(settings: CliSettings) -> tuple[str, AcceptTpmReply]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            found = await views.vm_status(client, vm_id)
            flagged = found.tpm_reset if found is not None else None
            confirm(
                f"Accept the newest stored TPM of {vm} as its own? "
                + (f"It was flagged: {flagged}. " if flagged else "")
                + "Its next start then gets that TPM, and what the guest sealed into the old "
                "one is only in the history.",
                yes=yes,
            )
            return vm_id, await client.accept_tpm(vm_id, requested_by=getpass.getuser())

    vm_id, accepted = run(work, follow=f"`keeper vm show {vm}`")
    if as_json:
        output.emit_json(
            document(
                "tpm-acceptance",
                {
                    "vm_id": vm_id,
                    "version": accepted.version,
                    "reset_version": accepted.reset_version,
                },
            )
        )
        return
    output.facts(
        [
            ("tpm accepted", vm),
            ("vm id", vm_id),
            ("version", accepted.version),
            ("reset ended", accepted.reset_version or "none was pending"),
        ]
    )


@vm_app.command("delete-state")
def delete_state(
    vm: VmArgument,
    reason: ReasonOption = "",
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a stopped VM's stored TPM and NVRAM state, its snapshots and its data key.
    The VM stays registered; its next start begins with an empty TPM and fresh UEFI
    variables. Says what is lost and asks first (--yes for automation)."""
    _delete(vm, disable=False, reason=reason, yes=yes, as_json=as_json)


@vm_app.command("disable-tpm")
def disable_tpm(
    vm: VmArgument,
    reason: ReasonOption = "",
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Disable a stopped VM's TPM: delete its stored state (as delete-state) and its
    registration. Says what is lost and asks first (--yes for automation)."""
    _delete(vm, disable=True, reason=reason, yes=yes, as_json=as_json)


@vm_app.command("clone")
def clone(
    source: VmArgument,
    target_vm_id: Annotated[
        str,
        typer.Argument(
            metavar="NEW_VM_ID",
            callback=inputs.vm_id,
            help="UUID of the new VM (no stored state).",
        ),
    ],
    tpm: Annotated[CloneTpm, typer.Option(help="copy: same TPM identity; fresh: a new TPM.")],
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give a new VM a copy of a VM's newest state (same TPM, or a fresh one)."""

    async def work(settings: CliSettings) -> tuple[str, dict[StateKind, int]]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, source)
            return vm_id, await client.clone_vm(vm_id, target_vm_id, tpm)

    source_id, versions = run(work, follow=f"`keeper vm history {target_vm_id}`")
    plain = {k.value: v for k, v in versions.items()}
    if as_json:
        output.emit_json(
            document(
                "clone",
                {
                    "source_vm_id": source_id,
                    "target_vm_id": target_vm_id,
                    "tpm": tpm.value,
                    "versions": plain,
                },
            )
        )
        return
    output.facts([("cloned", source), ("into", target_vm_id), ("tpm", tpm.value), *plain.items()])


PassphraseFileOption = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help=f"File whose first line is the passphrase (else {PASSPHRASE_VARIABLE}, else a "
        "prompt); at least 8 characters.",
    ),
]


@vm_app.command("export")
def export(
    vm: VmArgument,
    output_file: Annotated[
        Path, typer.Option("--output", "-o", metavar="FILE", help="Bundle file to write.")
    ],
    passphrase_file: PassphraseFileOption = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output file.")] = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a VM's newest state into an encrypted, portable bundle file (mode 0600)."""
    inputs.output_file(output_file, overwrite=force)
    secret = passphrase(confirm_it=True, passphrase_file=passphrase_file)

    async def work(settings: CliSettings) -> tuple[str, bytes]:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, vm)
            with progress(f"Exporting {vm}...", quiet=as_json):
                return vm_id, await client.export_state(vm_id, secret)

    vm_id, bundle = run(work)
    try:
        descriptor = os.open(output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(bundle)
    except OSError as error:
        output.failure(
            f"--output {output_file}: {error.strerror}; nothing was written",
            ExitCode.REFUSED,
            as_json=as_json,
        )
        raise typer.Exit(int(ExitCode.REFUSED)) from None
    if as_json:
        output.emit_json(
            document("export", {"vm_id": vm_id, "file": str(output_file), "bytes": len(bundle)})
        )
        return
    output.facts(
        [("exported", vm), ("vm id", vm_id), ("file", output_file), ("bytes", len(bundle))]
    )


@vm_app.command("import")
def import_(
    bundle_file: Annotated[
        Path,
        typer.Argument(metavar="BUNDLE", help="A bundle written by `keeper vm export`."),
    ],
    vm_id: Annotated[
        str | None,
        typer.Option(
            metavar="UUID",
            callback=inputs.vm_id,
            help="Import for this VM id (default: the bundle's).",
        ),
    ] = None,
    passphrase_file: PassphraseFileOption = None,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Verify a bundle and store it for a VM that has no stored state yet."""
    bundle = inputs.bundle_bytes(bundle_file)
    secret = passphrase(confirm_it=False, passphrase_file=passphrase_file)

    async def work(settings: CliSettings) -> str:
        async with connected(settings, needs=("store",)) as client:
            with progress(f"Importing {bundle_file}...", quiet=as_json):
                return str(await client.import_state(bundle, secret, target_vm_id=vm_id))

    imported = run(work, follow=f"`keeper vm history {vm_id}`" if vm_id else "`keeper vm list`")
    if as_json:
        output.emit_json(
            document("import", {"vm_id": imported, "file": str(bundle_file), "imported": True})
        )
        return
    output.facts([("imported", bundle_file), ("vm id", imported)])


# --- read-only commands (keeper_cli.view_commands) --------------------------------------

vm_app.command("create")(template_commands.create_vm)
vm_app.command("list")(view_commands.list_vms)
vm_app.command("show")(view_commands.show)
vm_app.command("status")(view_commands.status)
vm_app.command("history")(view_commands.history)
vm_app.command("ek")(view_commands.endorsement_key)
vm_app.command("snapshots")(view_commands.snapshots)
app.command("hosts")(view_commands.hosts)
