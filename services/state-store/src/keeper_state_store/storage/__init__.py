"""Versioned, fenced storage of TPM and NVRAM state in Redis."""
