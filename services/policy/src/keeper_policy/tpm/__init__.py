"""Whether a VM may have a TPM: the approval and guest-OS rules, enabling and disabling."""
