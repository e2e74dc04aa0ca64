"""Versioned, fenced storage of TPM and NVRAM state in Redis, and snapshots that pin it."""
