"""``keeper template create|list|show|delete`` and ``keeper vm create --template``.

A template is a TPM-enabled spec and, made from a VM, that VM's NVRAM (the Secure Boot keys
it enrolled); never a TPM state, so each VM made from it gets its own TPM on its first
start. Templates are not VMs: ``vm list`` does not show them and they cannot be started.
Registered in :mod:`keeper_cli.app`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from keeper_cli import inputs, output
from keeper_cli.config import CliSettings
from keeper_cli.errors import CliError, ExitCode
from keeper_cli.json_documents import document
from keeper_cli.options import (
    AllowDuplicateNameOption,
    JsonOption,
    OverrideGuestOsOption,
    OverrideOption,
    TimeoutOption,
    YesOption,
)
from keeper_cli.prompts import confirm, progress
from keeper_cli.running import RESOLVING, connected, resolve, run
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.replies import CreateVmFromTemplateReply, DeleteTemplateReply
from keeper_shared.messages.template import CreateTemplate, CreateVmFromTemplate, TemplateView
from keeper_shared.messages.tpm import Firmware, VmSpec

HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

template_app = typer.Typer(
    help="VM templates: a TPM-enabled spec and the NVRAM of a VM, never a TPM state.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
)

TemplateArgument = Annotated[
    str,
    typer.Argument(metavar="TEMPLATE", callback=inputs.vm_reference, help="Template name or id."),
]

_SPEC_OPTIONS = {
    "name": "NAME",
    "arch": "--arch",
    "machine": "--machine",
    "firmware": "--firmware",
    "memory_mib": "--memory-mib",
    "vcpus": "--vcpus",
    "guest_os": "--guest-os",
}


def _json(template: TemplateView) -> dict[str, Any]:
    spec = template.spec
    return document(
        "template",
        {
            "template_id": template.template_id,
            "name": template.name,
            "source_vm_id": template.source_vm_id,
            "nvram": template.nvram,
            "guest_os": spec.guest_os,
            "arch": spec.arch,
            "machine": spec.machine,
            "firmware": spec.firmware.value,
            "secure_boot": spec.secure_boot,
            "encrypt_state": spec.encrypt_tpm_state,
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
            "created_at": template.created_at.isoformat(),
        },
    )


def _facts(template: TemplateView) -> list[tuple[str, Any]]:
    spec = template.spec
    return [
        ("template", template.name),
        ("template id", template.template_id),
        ("made from", template.source_vm_id or "a spec"),
        ("nvram", "the VM's (enrolled keys)" if template.nvram else "none (firmware's own)"),
        ("tpm state", "none: each VM gets a new TPM"),
        ("guest os", spec.guest_os),
        ("machine", f"{spec.arch} {spec.machine} {spec.firmware.value}"),
        ("secure boot", "yes" if spec.secure_boot else "no"),
        ("state encrypted", "yes" if spec.encrypt_tpm_state else "no"),
        ("memory", f"{spec.memory_mib} MiB, {spec.vcpus} vCPU"),
        ("created", template.created_at.isoformat(timespec="seconds")),
    ]


async def find_template(client: KeeperClient, reference: str) -> TemplateView:
    """The template ``reference`` (a name or an id) names; else the command ends (exit 3)."""
    found = await views.template_named(client, reference, strict=True)
    if found is not None:
        return found
    raise CliError(
        f"unknown template {reference!r} (see `keeper template list`)", ExitCode.UNKNOWN_VM
    )


@template_app.command("create")
def create(
    name: Annotated[
        str, typer.Argument(metavar="NAME", callback=inputs.domain_name, help="Template name.")
    ],
    from_vm: Annotated[
        str | None,
        typer.Option(
            "--from-vm",
            metavar="VM",
            callback=inputs.optional_vm_reference,
            help="Make it from this registered VM: its spec and its newest stored NVRAM.",
        ),
    ] = None,
    guest_os: Annotated[
        str | None,
        typer.Option(metavar="OS", help="Make it from a spec for this guest OS (no NVRAM)."),
    ] = None,
    arch: Annotated[str | None, typer.Option(metavar="ARCH", help="Guest architecture.")] = None,
    machine: Annotated[str | None, typer.Option(metavar="TYPE", help="Machine type.")] = None,
    firmware: Annotated[Firmware | None, typer.Option(help="Boot firmware.")] = None,
    memory_mib: Annotated[
        int | None,
        typer.Option(metavar="MIB", min=16, max=4 * 1024 * 1024, help="Guest RAM in MiB."),
    ] = None,
    vcpus: Annotated[
        int | None, typer.Option(metavar="N", min=1, max=512, help="Virtual CPUs.")
    ] = None,
    secure_boot: Annotated[
        bool | None, typer.Option("--secure-boot", help="UEFI Secure Boot.")
    ] = None,
    encrypt_state: Annotated[
        bool | None,
        typer.Option("--encrypt-state", help="Encrypt each VM's TPM state (a libvirt secret)."),
    ] = None,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a template from a VM (--from-vm: its spec and its NVRAM with the keys it
    enrolled) or from a spec (--guest-os and the spec options: no NVRAM). Never a TPM state:
    each VM made from it gets a new TPM. Disks and interfaces are not kept."""
    spec_options = (arch, machine, firmware, memory_mib, vcpus, secure_boot, encrypt_state)
    if (from_vm is None) == (guest_os is None):
        raise inputs.usage("give --from-vm VM or --guest-os OS (a template is made from one)")
    if from_vm is not None and any(option is not None for option in spec_options):
        raise inputs.usage("the spec options go with --guest-os; --from-vm takes the VM's spec")
    template_id = str(uuid.uuid4())
    spec = None
    if guest_os is not None:
        try:
            spec = VmSpec(
                vm_id=template_id,
                name=name,
                guest_os=guest_os,
                arch=arch or "x86_64",
                machine=machine or "q35",
                firmware=firmware or Firmware.UEFI,
                memory_mib=memory_mib or 256,
                vcpus=vcpus or 1,
                secure_boot=bool(secure_boot),
                encrypt_tpm_state=bool(encrypt_state),
            )
        except ValidationError as error:
            raise inputs.model_error(error, _SPEC_OPTIONS) from None

    async def work(settings: CliSettings) -> TemplateView:
        async with connected(settings, needs=RESOLVING) as client:
            vm_id = await resolve(client, from_vm) if from_vm is not None else None
            request = CreateTemplate(
                template_id=template_id, name=name, from_vm_id=vm_id, spec=spec
            )
            with progress(f"Creating the template {name}...", quiet=as_json):
                created: TemplateView = await client.create_template(request)
                return created

    template = run(work, follow=f"`keeper template show {name}`")
    if as_json:
        output.emit_json(_json(template))
        return
    output.facts(_facts(template))


@template_app.command("list")
def list_templates(timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
    """Every template (templates are not VMs: `keeper vm list` does not show them)."""

    async def work(settings: CliSettings) -> list[TemplateView]:
        async with connected(settings, needs=("policy",)) as client:
            templates: list[TemplateView] = await client.list_templates()
            return templates

    templates = run(work)
    if as_json:
        output.emit_json([_json(template) for template in templates])
        return
    output.table(
        None,
        ["NAME", "TEMPLATE ID", "GUEST OS", "SECURE BOOT", "NVRAM", "FROM VM"],
        [
            [
                item.name,
                item.template_id,
                item.spec.guest_os,
                item.spec.secure_boot,
                item.nvram,
                item.source_vm_id or "-",
            ]
            for item in templates
        ],
    )


@template_app.command("show")
def show(
    template: TemplateArgument, timeout: TimeoutOption = None, as_json: JsonOption = False
) -> None:
    """One template: its spec, where it came from, whether it holds an NVRAM."""

    async def work(settings: CliSettings) -> TemplateView:
        async with connected(settings, needs=("policy",)) as client:
            return await find_template(client, template)

    found = run(work)
    if as_json:
        output.emit_json(_json(found))
        return
    output.facts(_facts(found))


@template_app.command("delete")
def delete(
    template: TemplateArgument,
    yes: YesOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a template and its NVRAM copy. VMs made from it keep their own NVRAM. Asks
    first (--yes for automation)."""

    async def work(settings: CliSettings) -> tuple[TemplateView, DeleteTemplateReply]:
        async with connected(settings, needs=("policy",)) as client:
            found = await find_template(client, template)
            held = " and its NVRAM (the enrolled keys)" if found.nvram else ""
            confirm(f"Delete the template {found.name}{held}? Continue?", yes=yes)
            with progress(f"Deleting the template {found.name}...", quiet=as_json):
                return found, await client.delete_template(found.template_id)

    found, deleted = run(work, follow="`keeper template list`")
    nvram_versions = deleted.nvram_versions
    if as_json:
        output.emit_json(
            document(
                "template-deletion",
                {
                    "template_id": found.template_id,
                    "name": found.name,
                    "deleted": True,
                    "nvram_versions": nvram_versions,
                },
            )
        )
        return
    output.facts(
        [
            ("template deleted", found.name),
            ("template id", found.template_id),
            ("nvram versions", nvram_versions),
        ]
    )


def create_vm(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", callback=inputs.domain_name, help="libvirt domain name."),
    ],
    template: Annotated[
        str,
        typer.Option(
            "--template",
            metavar="TEMPLATE",
            callback=inputs.vm_reference,
            help="The template (name or id) to make it from.",
        ),
    ],
    vm_id: Annotated[
        str | None,
        typer.Option(
            metavar="UUID", callback=inputs.vm_id, help="The VM's UUID (a new one by default)."
        ),
    ] = None,
    override: OverrideOption = False,
    override_guest_os: OverrideGuestOsOption = False,
    allow_duplicate_name: AllowDuplicateNameOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a new VM from a template, through the TPM approval rules (as enable-tpm).
    Its first start gets the template's NVRAM (the enrolled Secure Boot keys) and a new
    TPM: a template holds no TPM state."""
    new_vm_id = vm_id or str(uuid.uuid4())

    async def work(settings: CliSettings) -> tuple[TemplateView, CreateVmFromTemplateReply]:
        async with connected(settings, needs=RESOLVING) as client:
            found = await find_template(client, template)
            request = CreateVmFromTemplate(
                template_id=found.template_id,
                vm_id=new_vm_id,
                name=name,
                override=override,
                override_guest_os=override_guest_os,
                allow_duplicate_name=allow_duplicate_name,
            )
            with progress(f"Creating {name} from {found.name}...", quiet=as_json):
                return found, await client.create_vm_from_template(request)

    found, created = run(work, follow=f"`keeper vm show {new_vm_id}`")
    nvram = "copied" if created.nvram_copied else "none"
    if as_json:
        output.emit_json(
            document(
                "vm-creation",
                {
                    "vm_id": new_vm_id,
                    "name": name,
                    "template_id": found.template_id,
                    "tpm_xml": created.tpm_xml or "",
                    "nvram": nvram,
                },
            )
        )
        return
    output.facts(
        [
            ("created", name),
            ("vm id", new_vm_id),
            ("template", found.name),
            ("nvram", "the template's" if nvram == "copied" else "the firmware's own"),
            ("tpm", "new on its first start"),
        ]
    )
