"""``keeper``: vTPM Keeper for people and automation.

Every command talks to policy and the state store over RabbitMQ (``KEEPER_AMQP_URL``,
by default the local stack of ``make demo``); ``status``, ``hosts`` and VM names are their
answers to queries, so the CLI needs no access to their storage. Human tables by default,
``--json`` for scripts; exit codes are listed in :class:`~keeper_cli.errors.ExitCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aio_pika.exceptions
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from keeper_cli import output, views
from keeper_cli.client import KeeperClient, KeeperRequestError
from keeper_cli.config import CliSettings
from keeper_cli.errors import CliError, ExitCode
from keeper_cli.loss import describe_loss
from keeper_shared.bus.client import BusClient, CallError, CallTimeoutError
from keeper_shared.bus.topology import POLICY, POLICY_COMMANDS, STATE_STORE, STATE_STORE_COMMANDS
from keeper_shared.domain_document import (
    MAX_DOMAIN_XML_CHARS,
    DomainDocumentError,
    read_domain_element,
)
from keeper_shared.messages.adoption import AdoptVm, UnprotectedVmView, VmAdoptionResult
from keeper_shared.messages.envelope import MessageError
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.tpm import Firmware, VmSpec
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import StateKind

T = TypeVar("T")

app = typer.Typer(
    name="keeper",
    help="vTPM Keeper: keep every VM's TPM and UEFI NVRAM state safe off its host.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
vm_app = typer.Typer(
    help="Enable, start, stop, snapshot, restore, clone, move VMs.", no_args_is_help=True
)
app.add_typer(vm_app, name="vm")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for automation.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
VmArgument = Annotated[str, typer.Argument(help="VM id (UUID) or its unique domain name.")]


# --- plumbing ---------------------------------------------------------------------------


def _settings() -> CliSettings:
    return CliSettings()


def _run(work: Callable[[CliSettings], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` and turn every expected failure into a message and an exit code."""
    settings = _settings()
    try:
        return asyncio.run(work(settings))
    except CliError as error:
        output.stderr.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(int(error.code)) from None
    except KeeperRequestError as error:
        output.stderr.print(f"[red]refused:[/red] {error}", highlight=False)
        raise typer.Exit(int(ExitCode.REFUSED)) from None
    except CallTimeoutError as error:
        output.stderr.print(
            f"[red]timeout:[/red] {error}; it may still be carried out", highlight=False
        )
        raise typer.Exit(int(ExitCode.TIMEOUT)) from None
    except CallError as error:
        output.stderr.print(f"[red]unreachable:[/red] {error}", highlight=False)
        raise typer.Exit(int(ExitCode.UNREACHABLE)) from None
    except MessageError as error:
        output.stderr.print(f"[red]error:[/red] unexpected reply ({error})", highlight=False)
        raise typer.Exit(int(ExitCode.REFUSED)) from None


def _where(url: str) -> str:
    """host:port of a URL, without credentials."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]


@contextlib.asynccontextmanager
async def _client(settings: CliSettings, *, needs: tuple[str, ...]) -> AsyncIterator[Any]:
    """A connected client; checks that the services in
    ``needs`` (``policy``, ``store``) have a consumer, so a missing one fails at once."""
    try:
        bus = await asyncio.wait_for(
            BusClient.connect(
                settings.amqp_endpoints,
                source=f"client/keeper-{getpass.getuser()}",
                origin="client",
            ),
            timeout=15,
        )
    except (aio_pika.exceptions.AMQPError, OSError, TimeoutError):
        raise CliError(
            f"cannot reach RabbitMQ at {', '.join(map(_where, settings.amqp_endpoints))} "
            "(set KEEPER_AMQP_URL; for the local stack: `make stack-status`)",
            ExitCode.UNREACHABLE,
        ) from None
    try:
        for service in needs:
            await _require_consumer(bus, service, settings)
        yield KeeperClient(
            bus,
            request_timeout_s=settings.timeout_s,
            store_target=settings.store_target,
            policy_target=settings.policy_target,
        )
    finally:
        await bus.close(2.0)


async def _require_consumer(bus: BusClient, service: str, settings: CliSettings) -> None:
    if service == "store":
        if settings.store_target != STATE_STORE:
            return  # a private store (tests): its queue has another name
        queue_name, label = STATE_STORE_COMMANDS.name, "state store"
    else:
        if settings.policy_target != POLICY:
            return  # a private policy (tests): its queue has another name
        queue_name, label = POLICY_COMMANDS.name, "policy service"
    channel = await bus.connection.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        consumers = queue.declaration_result.consumer_count
    except aio_pika.exceptions.ChannelClosed:
        consumers = 0
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    if not consumers:
        raise CliError(
            f"no {label} is running (nothing consumes {queue_name})", ExitCode.UNREACHABLE
        )


RESOLVING = ("policy", "store")
"""The services a VM reference needs: policy knows the registered VMs, the store those
that only have stored state (imported or cloned, not registered yet)."""


async def _resolve(client: KeeperClient, reference: str) -> str:
    """The VM id of a VM id or name; unknown VMs end the command (exit 3)."""
    matches = await views.resolve_vm(client, reference)
    if not matches:
        raise CliError(
            f"unknown VM {reference!r} (see `keeper vm status`; enable its TPM first)",
            ExitCode.UNKNOWN_VM,
        )
    if len(matches) > 1:
        raise CliError(
            f"{len(matches)} VMs are named {reference!r}: give the VM id ({', '.join(matches)})",
            ExitCode.USAGE,
        )
    return matches[0]


@contextlib.contextmanager
def _progress(message: str, *, quiet: bool, total: int = 1) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr while a long request runs (nothing with --json): elapsed
    time, and done/total when there are several items. Yields the "one item done" step.
    Into a pipe or a log file it draws nothing: a bar there is only noise."""
    if quiet or not output.stderr.is_terminal:
        yield lambda: None
        return
    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total > 1:
        columns += [BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=output.stderr, transient=True) as bar:
        task = bar.add_task(message, total=total)
        yield lambda: bar.advance(task)


def _confirm(question: str, *, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(
            f"{question} Not confirmed: pass --yes to do it without asking.", ExitCode.ABORTED
        )
    if not typer.confirm(question, default=False, err=True):
        raise CliError("not confirmed; nothing was changed", ExitCode.ABORTED)


def _passphrase(confirm: bool, passphrase_file: Path | None) -> str:
    if passphrase_file is not None:
        return passphrase_file.read_text(encoding="utf-8").rstrip("\n")
    from_env = os.environ.get("KEEPER_BUNDLE_PASSPHRASE")
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise CliError(
            "a bundle passphrase is needed: --passphrase-file or KEEPER_BUNDLE_PASSPHRASE",
            ExitCode.USAGE,
        )
    return str(
        typer.prompt("Bundle passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    )


# --- vm ---------------------------------------------------------------------------------


@vm_app.command("enable-tpm")
def enable_tpm(
    name: Annotated[str, typer.Argument(help="libvirt domain name.")],
    guest_os: Annotated[str, typer.Option(help="Guest OS, e.g. windows-11, rhel-9.2, win2k22.")],
    vm_id: Annotated[str | None, typer.Option(help="The VM's UUID (a new one by default).")] = None,
    arch: Annotated[str, typer.Option(help="Guest architecture.")] = "x86_64",
    machine: Annotated[str, typer.Option(help="Machine type.")] = "q35",
    firmware: Annotated[Firmware, typer.Option(help="Boot firmware.")] = Firmware.UEFI,
    memory_mib: Annotated[int, typer.Option(help="Guest RAM in MiB.")] = 256,
    secure_boot: Annotated[bool, typer.Option(help="UEFI Secure Boot.")] = False,
    encrypt_state: Annotated[
        bool,
        typer.Option(
            help="Encrypt the TPM state with a per-VM libvirt secret the keeper creates and "
            "keeps (needs hosts whose libvirt has a secret driver, as qemu:///system does)."
        ),
    ] = False,
    override: Annotated[bool, typer.Option(help="Approve despite failed checks.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Ask policy to approve a TPM for a VM and register it."""
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
    except ValueError as error:
        raise typer.BadParameter(str(error).splitlines()[0]) from None

    async def work(settings: CliSettings) -> str:
        async with _client(settings, needs=("policy",)) as client:
            with _progress(f"Asking policy about {name}...", quiet=as_json):
                xml: str = await client.enable_tpm(spec, override=override)
                return xml

    tpm_xml = _run(work)
    if as_json:
        output.emit_json(
            {
                "vm_id": spec.vm_id,
                "name": name,
                "approved": True,
                "tpm_xml": tpm_xml,
                "encrypt_state": encrypt_state,
            }
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
    host: Annotated[str, typer.Option(help="The host to start it on.")],
    domain_xml_file: Annotated[
        Path | None,
        typer.Option(
            "--domain-xml",
            help="Your own libvirt domain XML (virsh dumpxml, virt-install --print-xml): "
            "policy checks it against the VM's approval, adds the TPM and NVRAM it needs, "
            "keeps the rest as written, and uses it for later starts too.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Start a VM on a host with its newest stored TPM and NVRAM state."""
    domain_xml = _read_domain_xml(domain_xml_file) if domain_xml_file is not None else None

    async def work(settings: CliSettings) -> tuple[str, int]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, vm)
            with _progress(f"Starting {vm} on {host}...", quiet=as_json):
                return vm_id, int(await client.start(vm_id, host, domain_xml=domain_xml))

    vm_id, epoch = _run(work)
    if as_json:
        output.emit_json({"vm_id": vm_id, "host": host, "epoch": epoch, "started": True})
        return
    output.facts([("started", vm), ("vm id", vm_id), ("host", host), ("placement epoch", epoch)])


def _read_domain_xml(path: Path) -> str:
    """The file's domain XML, checked as policy checks it first (size, well-formed, no
    DOCTYPE or entities, a `<domain>`), before anything is sent."""
    try:
        with path.open(encoding="utf-8") as file:
            text = file.read(MAX_DOMAIN_XML_CHARS + 1)
        read_domain_element(text)
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}") from None
    except (UnicodeDecodeError, DomainDocumentError) as error:
        raise typer.BadParameter(f"{path}: {error}") from None
    return text


StopOutcome = tuple[str, str, bool | None, str | None]
"""A stop's VM reference, VM id, whether its final state was retrieved, and the error."""

STOP_CONCURRENCY = 4
"""Stops sent to policy at once; each waits for its guest, so a few overlap well."""


def _stop(vms: list[str], mode: StopMode, as_json: bool) -> None:
    verb = "Shutting down" if mode is StopMode.SHUTDOWN else "Powering off"

    async def stop_one(client: Any, reference: str, vm_id: str) -> StopOutcome:
        try:
            return reference, vm_id, bool(await client.stop(vm_id, mode)), None
        except (KeeperRequestError, CallError, MessageError) as error:
            if len(vms) == 1:
                raise
            return reference, vm_id, None, str(error)

    async def work(settings: CliSettings) -> list[StopOutcome]:
        gate = asyncio.Semaphore(STOP_CONCURRENCY)
        async with _client(settings, needs=RESOLVING) as client:
            vm_ids = [await _resolve(client, reference) for reference in vms]
            what = vms[0] if len(vms) == 1 else f"{len(vms)} VMs"
            message = f"{verb} {what} (retrieving the final state first)..."
            with _progress(message, quiet=as_json, total=len(vms)) as one_done:

                async def gated(reference: str, vm_id: str) -> StopOutcome:
                    async with gate:
                        outcome = await stop_one(client, reference, vm_id)
                    one_done()
                    return outcome

                return list(await asyncio.gather(*map(gated, vms, vm_ids)))

    outcomes = _run(work)
    failed = [item for item in outcomes if item[3] is not None]
    if as_json:
        documents = [
            {"vm_id": vm_id, "mode": mode.value, "stopped": error is None, "retrieved": retrieved}
            | ({"error": error} if error is not None else {})
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
            ["VM", "ID", "STOPPED", "FINAL STATE RETRIEVED", "ERROR"],
            [
                [ref, vm_id, error is None, retrieved, error]
                for ref, vm_id, retrieved, error in outcomes
            ],
        )
    if any(retrieved is False for _, _, retrieved, _ in outcomes):
        output.stderr.print(
            "[yellow]warning:[/yellow] a final state could not be retrieved; the newest "
            "stored version is what a restart gets (see `keeper vm status`)."
        )
    if failed:
        raise typer.Exit(int(ExitCode.REFUSED))


VmsArgument = Annotated[list[str], typer.Argument(help="VM ids (UUIDs) or domain names.")]


@vm_app.command("shutdown")
def shutdown(vms: VmsArgument, as_json: JsonOption = False) -> None:
    """Shut VMs down (guest shutdown), keeping their final state, and remove them from their
    hosts. With several VMs: one JSON object each, in a list."""
    _stop(vms, StopMode.SHUTDOWN, as_json)


@vm_app.command("poweroff")
def poweroff(vms: VmsArgument, as_json: JsonOption = False) -> None:
    """Power VMs off, keeping their final state (retrieved while they still run). With
    several VMs: one JSON object each, in a list."""
    _stop(vms, StopMode.POWEROFF, as_json)


@vm_app.command("status")
def status(
    vm: Annotated[str | None, typer.Argument(help="One VM (id or name); all by default.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Every VM: host, placement epoch, newest persisted state and its age, protection; and
    the TPM domains hosts reported that are not adopted, with the reasons."""

    async def work(
        settings: CliSettings,
    ) -> tuple[list[views.VmStatus], list[UnprotectedVmView]]:
        async with _client(settings, needs=RESOLVING) as client:
            unprotected = await client.list_unprotected()
            if vm is None:
                return await views.vm_statuses(client), unprotected
            named = [item for item in unprotected if views.names(item, vm)]
            if named and not await views.resolve_vm(client, vm):
                return [], named
            one = await views.vm_status(client, await _resolve(client, vm))
            return ([one] if one is not None else []), named

    found, unprotected = _run(work)
    now = time.time()
    if as_json:
        documents = [item.as_json(now) for item in found]
        documents += [views.unprotected_json(item) for item in unprotected]
        output.emit_json(sorted(documents, key=lambda doc: (doc["name"] or "", doc["vm_id"])))
        return
    if not found and not unprotected:
        output.stdout.print("No VMs yet: `keeper vm enable-tpm NAME --guest-os OS` registers one.")
        return
    if found:
        output.table(
            None,
            ["VM", "ID", "HOST", "EPOCH", "TPM", "ENCRYPTED", "NVRAM", "PERSISTED", "PROTECTION"],
            [
                [
                    item.name,
                    item.vm_id,
                    item.host or "(stopped)",
                    item.epoch,
                    _version(item.kinds.get("tpm")),
                    "yes" if item.tpm_encrypted else "no",
                    _version(item.kinds.get("nvram")),
                    _ago(item.newest_stored_at(), now),
                    item.protection(),
                ]
                for item in found
            ],
        )
    if unprotected:
        output.table(
            "TPM domains not protected (`keeper vm adopt NAME` adopts one)",
            ["VM", "ID", "HOST", "RUNNING", "WHY NOT"],
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


@vm_app.command("adopt")
def adopt(
    vm: VmArgument,
    host: Annotated[
        str | None, typer.Option(help="The host it is on, when several report that name.")
    ] = None,
    guest_os: Annotated[
        str | None,
        typer.Option(help="Guest OS, when the domain's metadata names none (e.g. windows-11)."),
    ] = None,
    override: Annotated[
        bool, typer.Option(help="Adopt although the cluster's hosts do not all report swtpm.")
    ] = False,
    override_guest_os: Annotated[
        bool, typer.Option(help="Adopt although the guest-OS rules do not allow a TPM.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Protect a TPM domain a host reported that vTPM Keeper did not define: registered from
    its XML and placed where it runs, never redefined or restarted. The approval rules
    still apply; the host's adoption mode does not."""
    try:
        request = AdoptVm(
            vm=vm,
            host=host,
            guest_os=guest_os,
            override=override,
            override_guest_os=override_guest_os,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error).splitlines()[0]) from None

    async def work(settings: CliSettings) -> VmAdoptionResult:
        async with _client(settings, needs=("policy",)) as client:
            with _progress(f"Adopting {vm}...", quiet=as_json):
                result: VmAdoptionResult = await client.adopt(request)
                return result

    result = _run(work)
    if as_json:
        output.emit_json(result.model_dump(mode="json"))
    if not result.adopted:
        code = ExitCode.UNKNOWN_VM if result.vm_id is None else ExitCode.REFUSED
        output.stderr.print(f"[red]refused:[/red] {'; '.join(result.reasons)}", highlight=False)
        raise typer.Exit(int(code))
    if not as_json:
        rows: list[tuple[str, Any]] = [
            ("adopted", result.name or vm),
            ("vm id", result.vm_id),
            ("host", result.host),
            ("placement epoch", result.epoch),
        ]
        if result.overridden:
            rows.append(("overridden", "; ".join(result.overridden)))
        output.facts(rows)


def _ago(timestamp: float | None, now: float) -> str | None:
    return None if timestamp is None else f"{output.age(now - timestamp)} ago"


def _version(kind: views.KindStatus | None) -> str | None:
    return None if kind is None or kind.version is None else f"v{kind.version}"


@vm_app.command("history")
def history(vm: VmArgument, as_json: JsonOption = False) -> None:
    """Every kept version of a VM's TPM and NVRAM state."""

    async def work(settings: CliSettings) -> Any:
        async with _client(settings, needs=RESOLVING) as client:
            return await client.state_history(await _resolve(client, vm))

    reply = _run(work)
    if as_json:
        output.emit_json(reply.model_dump(mode="json"))
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
            "STORED",
            "SIZE",
            "HASH",
            "ORIGIN",
            "HOST",
            "EPOCH",
            "SNAPSHOTS",
            "SCRUB",
        ],
        rows,
    )


@vm_app.command("restore")
def restore(
    vm: VmArgument,
    host: Annotated[str, typer.Option(help="Host to start the VM on with the restored state.")],
    version: Annotated[int | None, typer.Option(help="The version to restore.")] = None,
    kind: Annotated[
        list[StateKind] | None, typer.Option(help="Which state (default: both kinds).")
    ] = None,
    snapshot: Annotated[str | None, typer.Option(help="Restore a snapshot instead.")] = None,
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Start a VM with an older version (or a snapshot) of its state."""
    if (version is None) == (snapshot is None):
        raise typer.BadParameter("give exactly one of --version or --snapshot")
    kinds = kind or list(StateKind)

    async def work(settings: CliSettings) -> tuple[str, dict[str, str]]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, vm)
            if not hasattr(client, "place"):
                raise CliError("this build's client cannot restore", ExitCode.REFUSED)
            reply = await client.state_history(vm_id)
            heads = {item.kind: item.head_version for item in reply.kinds}
            if version is not None:
                newer = [
                    f"{k.value} v{version + 1}..v{heads[k]}"
                    for k in kinds
                    if heads.get(k) is not None and heads[k] > version
                ]
                what = f"version {version} of {', '.join(k.value for k in kinds)}"
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
            if newer:
                _confirm(
                    f"{vm} will start on {host} with {what}; the newer state "
                    f"({'; '.join(newer)}) stops being the newest and the guest loses whatever "
                    "it sealed since. Continue?",
                    yes=yes,
                )
            with _progress(f"Restoring {vm} on {host}...", quiet=as_json):
                detail = await client.place(
                    vm_id,
                    host,
                    versions=dict.fromkeys(kinds, version) if version is not None else None,
                    snapshot_id=snapshot,
                    allow_older=True,
                )
            if detail.get("note") == "already placed":
                raise CliError(
                    f"{vm} already runs on {host}: nothing was restored. Shut it down first "
                    f"(`keeper vm shutdown {vm}`), then restore.",
                    ExitCode.REFUSED,
                )
            return vm_id, dict(detail)

    vm_id, detail = _run(work)
    if as_json:
        output.emit_json({"vm_id": vm_id, "host": host, "restored": True, **detail})
        return
    output.facts([("restored", vm), ("vm id", vm_id), ("host", host), *sorted(detail.items())])


@vm_app.command("snapshot")
def snapshot(
    vm: VmArgument,
    name: Annotated[
        str | None, typer.Option("--name", help="Snapshot id (default: a timestamp).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Pin the VM's newest stored TPM and NVRAM versions under a snapshot id."""
    snapshot_id = name or time.strftime("snap-%Y%m%d-%H%M%S")

    async def work(settings: CliSettings) -> tuple[str, dict[StateKind, int]]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, vm)
            return vm_id, await client.create_snapshot(vm_id, snapshot_id)

    vm_id, pinned = _run(work)
    versions = {k.value: v for k, v in pinned.items()}
    if as_json:
        output.emit_json({"vm_id": vm_id, "snapshot_id": snapshot_id, "versions": versions})
        return
    output.facts(
        [("snapshot", snapshot_id), ("vm id", vm_id), *((k, f"v{v}") for k, v in versions.items())]
    )


@vm_app.command("snapshots")
def snapshots(vm: VmArgument, as_json: JsonOption = False) -> None:
    """List a VM's snapshots."""

    async def work(settings: CliSettings) -> Any:
        async with _client(settings, needs=RESOLVING) as client:
            return await client.list_snapshots(await _resolve(client, vm))

    found = _run(work)
    if as_json:
        output.emit_json([item.model_dump(mode="json") for item in found])
        return
    output.table(
        None,
        ["SNAPSHOT", "CREATED", "TPM", "NVRAM"],
        [
            [
                item.snapshot_id,
                item.created_at.astimezone().isoformat(timespec="seconds"),
                *(f"v{item.versions[k]}" if k in item.versions else None for k in StateKind),
            ]
            for item in found
        ],
    )


@vm_app.command("snapshot-delete")
def snapshot_delete(
    vm: VmArgument,
    snapshot_id: Annotated[str, typer.Argument(help="The snapshot to delete.")],
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Delete a snapshot (versions only it kept are deleted with it)."""

    async def work(settings: CliSettings) -> tuple[str, bool]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, vm)
            _confirm(
                f"Delete snapshot {snapshot_id} of {vm}? TPM and NVRAM versions that only this "
                "snapshot keeps are deleted and cannot be restored afterwards.",
                yes=yes,
            )
            return vm_id, bool(await client.delete_snapshot(vm_id, snapshot_id))

    vm_id, deleted = _run(work)
    if as_json:
        output.emit_json({"vm_id": vm_id, "snapshot_id": snapshot_id, "deleted": deleted})
        return
    output.stdout.print(f"snapshot {snapshot_id}: {'deleted' if deleted else 'there was none'}")


def _delete(vm: str, *, disable: bool, reason: str, yes: bool, as_json: bool) -> None:
    """``delete-state`` and ``disable-tpm``: say what is lost, confirm, delete."""

    async def work(settings: CliSettings) -> tuple[str, dict[str, int]]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, vm)
            found = await views.vm_status(client, vm_id)
            if found is not None and found.host is not None:
                raise CliError(
                    f"{vm} runs on {found.host}: shut it down first (`keeper vm shutdown {vm}`)",
                    ExitCode.REFUSED,
                )
            lost = describe_loss(
                await client.state_history(vm_id), await client.list_snapshots(vm_id)
            )
            action = f"Disable the TPM of {vm}" if disable else f"Delete the stored state of {vm}"
            if lost:
                listed = "".join(f"\n  - {line}" for line in lost)
                _confirm(f"{action}? This deletes for good:{listed}\nContinue?", yes=yes)
            elif disable:
                _confirm(f"{action}? It has no stored state; it is no longer registered.", yes=yes)
            with _progress(f"{action}...", quiet=as_json):
                if disable:
                    return vm_id, await client.disable_tpm(vm_id, reason=reason)
                return vm_id, await client.delete_state(vm_id, reason=reason)

    vm_id, deleted = _run(work)
    if as_json:
        output.emit_json({"vm_id": vm_id, "tpm_disabled": disable, "deleted": deleted})
        return
    output.facts(
        [
            ("tpm disabled" if disable else "state deleted", vm),
            ("vm id", vm_id),
            *((name.replace("_", " "), count) for name, count in sorted(deleted.items())),
        ]
    )


ReasonOption = Annotated[str, typer.Option(help="Why, for the audit log.")]


@vm_app.command("delete-state")
def delete_state(
    vm: VmArgument, reason: ReasonOption = "", yes: YesOption = False, as_json: JsonOption = False
) -> None:
    """Delete a stopped VM's stored TPM and NVRAM state, its snapshots and its data key.

    The VM stays registered; its next start begins with an empty TPM and fresh UEFI
    variables. Says what is lost and asks first (--yes for automation)."""
    _delete(vm, disable=False, reason=reason, yes=yes, as_json=as_json)


@vm_app.command("disable-tpm")
def disable_tpm(
    vm: VmArgument, reason: ReasonOption = "", yes: YesOption = False, as_json: JsonOption = False
) -> None:
    """Disable a stopped VM's TPM: delete its stored state (as delete-state) and its
    registration. Says what is lost and asks first (--yes for automation)."""
    _delete(vm, disable=True, reason=reason, yes=yes, as_json=as_json)


@vm_app.command("clone")
def clone(
    source: VmArgument,
    target_vm_id: Annotated[str, typer.Argument(help="UUID of the new VM (no stored state).")],
    tpm: Annotated[CloneTpm, typer.Option(help="copy: same TPM identity; fresh: a new TPM.")],
    as_json: JsonOption = False,
) -> None:
    """Give a new VM a copy of a VM's newest state (same TPM, or a fresh one)."""
    try:
        target = str(uuid.UUID(target_vm_id))
    except ValueError:
        raise typer.BadParameter(f"not a UUID: {target_vm_id!r}") from None

    async def work(settings: CliSettings) -> tuple[str, dict[StateKind, int]]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, source)
            return vm_id, await client.clone_vm(vm_id, target, tpm)

    source_id, versions = _run(work)
    plain = {k.value: v for k, v in versions.items()}
    if as_json:
        output.emit_json(
            {"source_vm_id": source_id, "target_vm_id": target, "tpm": tpm.value, "versions": plain}
        )
        return
    output.facts([("cloned", source), ("into", target), ("tpm", tpm.value), *plain.items()])


@vm_app.command("export")
def export(
    vm: VmArgument,
    output_file: Annotated[Path, typer.Option("--output", "-o", help="Bundle file to write.")],
    passphrase_file: Annotated[
        Path | None, typer.Option(help="File holding the passphrase (else a prompt).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite the output file.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a VM's newest state into an encrypted, portable bundle file."""
    if output_file.exists() and not force:
        raise typer.BadParameter(f"{output_file} exists (use --force to overwrite)")

    async def work(settings: CliSettings) -> tuple[str, bytes]:
        async with _client(settings, needs=RESOLVING) as client:
            vm_id = await _resolve(client, vm)
            # In a thread: the connection keeps its heartbeats while someone types.
            passphrase = await asyncio.to_thread(_passphrase, True, passphrase_file)
            with _progress(f"Exporting {vm}...", quiet=as_json):
                return vm_id, await client.export_state(vm_id, passphrase)

    vm_id, bundle = _run(work)
    descriptor = os.open(output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(bundle)
    if as_json:
        output.emit_json({"vm_id": vm_id, "file": str(output_file), "bytes": len(bundle)})
        return
    output.facts(
        [("exported", vm), ("vm id", vm_id), ("file", output_file), ("bytes", len(bundle))]
    )


@vm_app.command("import")
def import_(
    bundle_file: Annotated[Path, typer.Argument(help="A bundle written by `keeper vm export`.")],
    vm_id: Annotated[
        str | None, typer.Option(help="Import for this VM id (default: the bundle's).")
    ] = None,
    passphrase_file: Annotated[
        Path | None, typer.Option(help="File holding the passphrase.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Verify a bundle and store it for a VM that has no stored state yet."""
    try:
        bundle = bundle_file.read_bytes()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {bundle_file}: {error.strerror}") from None

    async def work(settings: CliSettings) -> str:
        passphrase = _passphrase(False, passphrase_file)
        async with _client(settings, needs=("store",)) as client:
            with _progress(f"Importing {bundle_file}...", quiet=as_json):
                return str(await client.import_state(bundle, passphrase, target_vm_id=vm_id))

    imported = _run(work)
    if as_json:
        output.emit_json({"vm_id": imported, "file": str(bundle_file), "imported": True})
        return
    output.facts([("imported", bundle_file), ("vm id", imported)])


# --- hosts ------------------------------------------------------------------------------


@app.command("hosts")
def hosts(as_json: JsonOption = False) -> None:
    """Every host: alive, silent or lost, what it can run, and its TPM domains that are not
    protected."""

    async def work(
        settings: CliSettings,
    ) -> tuple[list[views.HostStatus], list[UnprotectedVmView]]:
        async with _client(settings, needs=("policy",)) as client:
            return await views.host_statuses(client), await client.list_unprotected()

    found, unprotected = _run(work)
    now = time.time()
    by_host: dict[str, list[UnprotectedVmView]] = {}
    for domain in unprotected:
        by_host.setdefault(domain.host, []).append(domain)
    if as_json:
        output.emit_json(
            [
                item.as_json(now)
                | {
                    "unprotected": [
                        {"vm_id": d.vm_id, "name": d.name, "reasons": list(d.reasons)}
                        for d in by_host.get(item.host, [])
                    ]
                }
                for item in found
            ]
        )
        return
    if not found:
        output.stdout.print("No host has sent a heartbeat yet.")
        return
    output.table(
        None,
        ["HOST", "STATUS", "LAST SEEN", "CLUSTER", "SWTPM", "ARCH", "UEFI", "VMS", "UNPROTECTED"],
        [
            [
                item.host,
                item.status,
                output.age(None if item.last_seen is None else now - item.last_seen),
                item.cluster,
                item.capabilities.get("swtpm_version"),
                ",".join(item.capabilities.get("architectures") or []) or None,
                item.capabilities.get("uefi_firmware"),
                item.vms,
                ", ".join(d.name for d in by_host.get(item.host, [])) or None,
            ]
            for item in found
        ],
    )
