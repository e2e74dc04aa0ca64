"""Versioned, fenced storage of TPM and NVRAM state in Redis, and the one way to read it back."""
