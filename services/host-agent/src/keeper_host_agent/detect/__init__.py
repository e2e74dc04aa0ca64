"""Noticing TPM and NVRAM state changes on this host and announcing the stable ones."""
