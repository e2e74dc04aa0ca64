"""Arguments and options several commands share, each with its input check
(:mod:`keeper_cli.inputs`), so a command declares them in one line and refuses bad input
as every other command does."""

from __future__ import annotations

from typing import Annotated

import typer

from keeper_cli import inputs

JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print JSON for scripts (schema: docs/cli-json.md); errors too, on stderr.",
    ),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        callback=inputs.timeout_s,
        help="How long to wait for an answer (default: KEEPER_TIMEOUT_S, else 120).",
    ),
]
VmArgument = Annotated[
    str,
    typer.Argument(
        metavar="VM", callback=inputs.vm_reference, help="VM id (UUID) or its domain name."
    ),
]
VmsArgument = Annotated[
    list[str],
    typer.Argument(
        metavar="VM...", callback=inputs.vm_references, help="VM ids (UUIDs) or domain names."
    ),
]
HostOption = Annotated[
    str,
    typer.Option(metavar="HOST", callback=inputs.host_id, help="The host to start it on."),
]
ReasonOption = Annotated[
    str, typer.Option(metavar="TEXT", callback=inputs.reason, help="Why, for the audit log.")
]
OverrideOption = Annotated[
    bool,
    typer.Option(
        "--override",
        help="Approve although not every live host of the cluster reports swtpm "
        "(the guest-OS rules still apply: see --override-guest-os).",
    ),
]
OverrideGuestOsOption = Annotated[
    bool,
    typer.Option(
        "--override-guest-os",
        help="Approve although the guest-OS rules refuse a TPM for this guest OS.",
    ),
]
AllowDuplicateNameOption = Annotated[
    bool,
    typer.Option(
        "--allow-duplicate-name",
        help="Register it although another VM has this name (that name then no longer "
        "names one VM: commands need the VM id).",
    ),
]
