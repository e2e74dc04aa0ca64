"""The work no stored version can skip, timed alone: what the invariants ask of the agent and
the store for one 16 KiB TPM state, without any framework around it.

The agent hashes and compresses the state and seals it to the store (nothing in clear on
the bus); the store opens it, verifies size and hash against what was announced, and
encrypts it under the VM's data key before Redis sees it. Timed in this process with
`time.process_time`, so the figure is the CPU those steps cost, comparable with the per
version CPU the pipeline measures in the same run.
"""

from __future__ import annotations

import os
import time
import uuid

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_shared.sealing.state_blobs import open_state_blob, seal_state_blob
from keeper_shared.state_format.blobs import open_blob, seal_blob
from keeper_state_store.crypto.encryption import (
    blob_associated_data,
    encrypt_blob,
    new_data_key,
)


def essential_cpu_per_version(size: int, count: int = 300) -> float:
    """CPU seconds per version of hash + compress + seal (agent) and open + verify +
    encrypt at rest (store), for random content of ``size`` bytes."""
    store_key = X25519PrivateKey.generate()
    keys = SealingPrivateKeys(store_key)
    receiver = SealingPublicKey(store_key.public_key())
    data_key = new_data_key()
    vm_id = str(uuid.uuid4())
    contents = [os.urandom(size) for _ in range(count)]
    began = time.process_time()
    for generation, content in enumerate(contents, start=1):
        blob = seal_blob(StateKind.TPM, content, FencingToken(epoch=1, generation=generation))
        sealed = seal_state_blob(vm_id, blob, receiver)
        opened = open_state_blob(vm_id, sealed, keys)
        open_blob(opened)
        encrypt_blob(
            data_key,
            opened.compressed.get_secret_value(),
            blob_associated_data(vm_id, "tpm", 1, generation, opened.content_hash),
        )
    return (time.process_time() - began) / count
