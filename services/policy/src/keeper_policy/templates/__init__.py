"""VM templates: a TPM-enabled spec and an NVRAM, never a TPM state."""
