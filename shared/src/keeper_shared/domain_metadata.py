"""The `<metadata>` element through which policy tells a host a VM's placement epoch."""

from __future__ import annotations

PLACEMENT_NAMESPACE = "https://vtpm-keeper.dev/xmlns/placement/1"
"""XML namespace of `<keeper:placement epoch='N'/>` inside a domain's `<metadata>`."""
