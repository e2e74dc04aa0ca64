"""The one place where a ``libvirt.libvirtError`` becomes one of the agent's errors.

The error class follows libvirt's error code, so callers tell "no such domain" from "libvirt
away" by type; the message stays libvirt's.
"""

from __future__ import annotations

from types import TracebackType

import libvirt

from keeper_host_agent.hypervisor.errors import (
    AccessDeniedError,
    DomainNotFoundError,
    HypervisorError,
    InvalidArgumentError,
    InvalidSecretError,
    MetadataNotFoundError,
    SecretNotFoundError,
    UnsupportedError,
)

_BY_CODE: dict[int, type[HypervisorError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: DomainNotFoundError,
    libvirt.VIR_ERR_NO_DOMAIN_METADATA: MetadataNotFoundError,
    libvirt.VIR_ERR_NO_SECRET: SecretNotFoundError,
    libvirt.VIR_ERR_INVALID_SECRET: InvalidSecretError,
    libvirt.VIR_ERR_OPERATION_DENIED: AccessDeniedError,
    libvirt.VIR_ERR_NO_SUPPORT: UnsupportedError,
    libvirt.VIR_ERR_INVALID_ARG: InvalidArgumentError,
}


def translated(error: libvirt.libvirtError, context: str = "") -> HypervisorError:
    """The agent's error for ``error``, its message prefixed with ``context`` when given."""
    message = f"{context}: {error}" if context else str(error)
    return _BY_CODE.get(error.get_error_code(), HypervisorError)(message)


def translating(context: str = "") -> Translating:
    """A ``with`` block whose ``libvirtError`` comes out as the agent's error."""
    return Translating(context)


class Translating:
    """Re-raises a ``libvirtError`` from its block as ``translated`` says."""

    def __init__(self, context: str) -> None:
        self._context = context

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        _type: type[BaseException] | None,
        error: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        # Never returning True lets mypy see that the block's exceptions propagate.
        if isinstance(error, libvirt.libvirtError):
            raise translated(error, self._context) from None
