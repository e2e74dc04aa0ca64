"""Which TPM a stored state is: a one-way fingerprint of its endorsement primary seed."""
