"""Snapshots of a VM: a pin of its stored state, or the workflow that includes memory."""
