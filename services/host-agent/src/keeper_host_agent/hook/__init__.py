"""libvirt's QEMU hook and the agent's side of it: starts and stops by any VM manager."""
