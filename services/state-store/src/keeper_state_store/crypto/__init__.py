"""Encryption at rest: per-VM data keys under the KEKs, sealed blobs and TPM secrets, rotation."""
