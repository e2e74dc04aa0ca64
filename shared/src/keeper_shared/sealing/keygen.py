"""`python -m keeper_shared.sealing.keygen PATH`: make a sealing key pair.

Writes a new X25519 private key to PATH (mode 0600; refuses to overwrite) and prints its
public key (base64) and key id. Run it for the store (every replica gets the same file;
hosts pin the printed public key as ``KEEPER_HOST_STORE_SEALING_KEY``), or on a host before
its agent first starts (the agent otherwise makes its own). With ``--public`` it prints
only the public key of an existing file, for scripts
(``KEEPER_STORE_SEALING_KEY="$(python -m keeper_shared.sealing.keygen --public FILE)"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from keeper_shared.sealing.keys import (
    SealingKeyFileError,
    SealingPublicKey,
    create_private_key_file,
    load_private_key,
)


def main(argv: list[str]) -> int:
    """Make (or, with ``--public``, read) the key file named in ``argv``; 2 on misuse."""
    show_only = "--public" in argv
    paths = [arg for arg in argv if arg != "--public"]
    if len(paths) != 1:
        print("usage: python -m keeper_shared.sealing.keygen [--public] PATH", file=sys.stderr)
        return 2
    path = Path(paths[0])
    try:
        key = load_private_key(path) if show_only else create_private_key_file(path)
    except SealingKeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    public = SealingPublicKey(key.public_key())
    if show_only:
        print(public.to_text())
        return 0
    print(f"public key: {public.to_text()}")
    print(f"key id:     {public.key_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
