"""Redis keys only policy uses (the shared ones, placement and VM record, are in
``keeper_shared.redis_access.keys``). Per-VM keys carry the ``{vm_id}`` hash tag like every VM key,
so a Lua script may touch a VM's placement, record and workflow together; per-host keys
carry ``{host:<id>}``."""

from __future__ import annotations

from keeper_shared.redis_access.keys import PREFIX

WORKFLOWS_INDEX = f"{PREFIX}:policy:workflows"
"""Sorted set: VM id -> creation time of its workflow. A hint for the sweep, written before
the workflow and cleared after it, so no workflow exists without an entry."""

HOST_STATUS = f"{PREFIX}:policy:host-status"
"""Hash: host id -> `alive:<last_seen>` or `lost:<declared_at>:<last_seen>`. One key, so the
alive -> lost transition is one atomic script with exactly one winner."""

EPOCH_PENDING = f"{PREFIX}:policy:epoch-pending"
"""Set: VMs moved by a migration whose destination has not confirmed the new epoch yet (so
a heartbeat is checked against a few VMs, not all it reports)."""

DISCOVERED = f"{PREFIX}:policy:discovered"
"""Hash: VM id -> JSON of a TPM/UEFI domain a host reported that is not adopted (its
``vm.discovered`` fact, why it is not adopted, when reported)."""

DISCOVERY_WAITING = f"{PREFIX}:policy:discovery-waiting"
"""Set: hosts that reported domains before policy heard their first heartbeat; those
domains are decided on the host's next heartbeat."""


TEMPLATES = f"{PREFIX}:policy:{{templates}}"
"""Hash: template id -> JSON of the template (``TemplateView``). Apart from VM records, so
a template is never listed, placed or started as a VM. The ``{templates}`` hash tag puts it
in one slot with :data:`TEMPLATE_NAMES`, which one script writes with it."""

TEMPLATE_NAMES = f"{PREFIX}:policy:{{templates}}:names"
"""Hash: template name -> template id, so a name names one template."""


NAMES_INDEXED = f"{PREFIX}:policy:vm-names-indexed"
"""String: set once every VM record registered before the name index existed is in it."""


def vm_name_key(name: str) -> str:
    """Hash: VM id -> when it claimed the domain name ``name`` (see ``storage.vm_names``). Its
    own hash tag: a name's claims are one slot, whichever VMs hold it."""
    return f"{PREFIX}:policy:{{name:{name}}}:vms"


def workflow_key(vm_id: str) -> str:
    """Hash: the VM's workflow in progress (id, kind, step, attempts, host, deadline...)."""
    return f"{PREFIX}:{{{vm_id}}}:workflow"


def workflow_lease_key(vm_id: str) -> str:
    """String with a TTL: the replica running the VM's workflow (SET NX PX)."""
    return f"{PREFIX}:{{{vm_id}}}:workflow-lease"


def workflow_result_key(vm_id: str) -> str:
    """String with a TTL: JSON outcome of the VM's last finished workflow, for a replica
    answering a redelivered request whose workflow another replica finished."""
    return f"{PREFIX}:{{{vm_id}}}:workflow-result"


def memory_snapshots_key(vm_id: str) -> str:
    """Hash: snapshot id -> JSON of the VM's snapshot with memory (its host, where the
    memory file is, and libvirt's snapshot XML, to redefine it after an undefine)."""
    return f"{PREFIX}:{{{vm_id}}}:memory-snapshots"


def migration_key(vm_id: str) -> str:
    """Hash with a TTL: the halves of a migration seen so far (`left`, `arrived`)."""
    return f"{PREFIX}:{{{vm_id}}}:migration"


def cleanup_lock_key(vm_id: str) -> str:
    """String with a TTL: one replica at a time tells a host to remove this VM."""
    return f"{PREFIX}:{{{vm_id}}}:cleanup-lock"


def host_vms_key(host: str) -> str:
    """Set: VMs placed on the host (a hint; each VM's placement hash is the truth)."""
    return f"{PREFIX}:{{host:{host}}}:vms"


def host_cleanup_key(host: str) -> str:
    """Set: VMs the host must remove, unretrieved, when it next reports them: they were
    placed on it when it was declared lost, or a stop could not confirm their undefine."""
    return f"{PREFIX}:{{host:{host}}}:cleanup"
