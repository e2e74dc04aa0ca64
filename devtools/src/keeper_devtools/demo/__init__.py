"""The walking-skeleton story: a sealed TPM secret survives moving a VM between two hosts."""
