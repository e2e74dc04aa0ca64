"""Workflows that survive a replica: the engine that runs them under leases, their store."""
