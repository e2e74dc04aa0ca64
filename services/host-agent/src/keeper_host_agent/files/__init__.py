"""Writing and removing TPM and NVRAM state files on this host, safely."""
