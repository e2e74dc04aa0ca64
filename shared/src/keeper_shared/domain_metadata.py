"""The keeper's `<metadata>` elements in a libvirt domain: the placement epoch policy gives
a host, and the adoption marker an operator gives a domain."""

from __future__ import annotations

PLACEMENT_NAMESPACE = "https://vtpm-keeper.dev/xmlns/placement/1"
"""XML namespace of `<keeper:placement epoch='N'/>` inside a domain's `<metadata>`."""

ADOPTION_NAMESPACE = "https://vtpm-keeper.dev/xmlns/adopt/1"
"""XML namespace of the adoption marker `<keeper:adopt guest-os='windows-11'/>` an operator
(or the VM manager) puts in a domain's `<metadata>`: a host whose adoption mode is `marked`
adopts such a domain by itself; `guest-os` (optional) names the guest OS for the TPM
approval rules."""
