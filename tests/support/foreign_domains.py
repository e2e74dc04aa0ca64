"""Domains another VM manager defined (virsh, virt-install, Nova, oVirt), as a simulated
host's libvirt ``test:///`` node file holds them: the host agent finds them when it connects,
as it finds a real host's domains when it starts."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from keeper_devtools.demo.hosts import SimulatedHost

TEST_DRIVER_NAMESPACE = "http://libvirt.org/schemas/domain/test/1.0"
"""The test driver's own elements (`<test:runstate>`) in a node file's domains."""

SHUT_OFF = 5
"""libvirt's `VIR_DOMAIN_SHUTOFF`, as `<test:runstate>` takes it."""


def foreign_domain_xml(
    vm_id: str,
    name: str,
    *,
    uefi: bool = True,
    tpm_version: str = "2.0",
    osinfo_id: str | None = "http://microsoft.com/win/11",
    metadata: str = "",
    running: bool = True,
) -> str:
    """A domain as virt-install writes one: libosinfo metadata, a UEFI loader with its
    NVRAM, an emulated TPM."""
    osinfo = (
        "<libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>"
        f"<libosinfo:os id={quoteattr(osinfo_id)}/></libosinfo:libosinfo>"
        if osinfo_id
        else ""
    )
    loader = (
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram/>"
        if uefi
        else ""
    )
    runstate = "" if running else f"<test:runstate>{SHUT_OFF}</test:runstate>"
    return f"""<domain type='qemu' xmlns:test='{TEST_DRIVER_NAMESPACE}'>
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <metadata>{osinfo}{metadata}</metadata>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{loader}</os>
  <features><acpi/><smm state='on'/></features>
  <devices>
    <tpm model='tpm-crb'><backend type='emulator' version='{tpm_version}'/></tpm>
  </devices>
  {runstate}
</domain>
"""


def shut_off(domain_xml: str) -> str:
    """``domain_xml`` (a domain element) as a node file holds it shut off."""
    runstate = f"<test:runstate xmlns:test='{TEST_DRIVER_NAMESPACE}'>{SHUT_OFF}</test:runstate>"
    return domain_xml.replace("</domain>", f"{runstate}</domain>", 1)


def define_in_node(host: SimulatedHost, *domains: str) -> None:
    """Make ``domains`` the host's libvirt domains the next time its agent connects."""
    node = host.root / "libvirt-node.xml"
    node.write_text("<node>\n" + "\n".join(domains) + "</node>\n", encoding="utf-8")
