"""The state format: canonical TPM archives, bounded compression, hashed blobs."""
