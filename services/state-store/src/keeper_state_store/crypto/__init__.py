"""Encryption at rest: AES-256-GCM data keys per VM, wrapped by the key-encryption keys."""
