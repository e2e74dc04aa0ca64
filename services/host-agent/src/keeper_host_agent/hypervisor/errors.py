"""The agent's own errors for what goes wrong in the hypervisor.

Only the libvirt adapter raises them (``libvirt_errors`` turns each ``libvirtError`` into
one of these); everything else catches these and never sees libvirt's exception type.
Messages are libvirt's text, which never holds state bytes or a secret's value.
"""

from __future__ import annotations


class HypervisorError(RuntimeError):
    """A hypervisor operation failed (libvirt away, refused, or failed)."""


class DomainNotFoundError(HypervisorError):
    """This host has no domain with that id."""


class MetadataNotFoundError(HypervisorError):
    """The domain has no metadata element in that namespace."""


class SecretNotFoundError(HypervisorError):
    """This host has no such secret, or the secret has no value."""


class InvalidSecretError(HypervisorError):
    """The hypervisor refuses the secret operation (its value is private)."""


class AccessDeniedError(HypervisorError):
    """The connection lacks the right for the operation (read-only, polkit)."""


class UnsupportedError(HypervisorError):
    """This hypervisor's driver does not do that (``test:///`` keeps no secrets)."""


class InvalidArgumentError(HypervisorError):
    """The driver refuses an argument or flag of the operation."""


class TpmSecretError(HypervisorError):
    """A TPM secret cannot be defined, read or removed; the message says why (never the
    value)."""


class TpmSecretUnreadableError(TpmSecretError):
    """The domain's secret exists but the hypervisor will not reveal its value
    (``private='yes'``), or it does not exist on this host."""
