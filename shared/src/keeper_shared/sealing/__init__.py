"""Sealing secrets to their receiver on the bus (TPM and NVRAM state, TPM secrets).

The store encrypts what it keeps in Redis; this package keeps the same bytes from resting
in clear in the broker's queue logs and dead-letter queues while they travel. A blob is
sealed to one receiver's X25519 public key (the store's for fetch replies, the target
host's for ``vm.prepare`` and ``state.newest.read``) with an ephemeral key agreement,
HKDF-SHA256 and AES-256-GCM, and bound to what it is (VM, kind, token, hash, receiver key).

- ``construction``: seal and open one payload (`SealBinding`, `SealingError`);
- ``keys``: key pairs, their ids, files and the ring of private keys a receiver holds;
- ``state_blobs``: a `StateBlob` or `TpmSecret` sealed for a message and opened from one;
- ``passphrases``: a bundle passphrase sealed to the store by the exporting client;
- ``wire``: between the construction's `SealedPayload` and the messages' `SealedBlob`;
- ``keygen``: ``python -m keeper_shared.sealing.keygen PATH`` makes a key file.
"""
