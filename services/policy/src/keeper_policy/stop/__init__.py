"""Stopping a VM with its final state retrieved: the step order and the workflow."""
