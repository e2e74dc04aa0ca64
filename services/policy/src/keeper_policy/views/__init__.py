"""Read-only answers to operators' queries (``vms.list``, ``hosts.list``): policy's records
shown as the typed views of :mod:`keeper_shared.messages.queries`, so no tool reads policy's
Redis keys."""
