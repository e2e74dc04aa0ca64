"""libvirt behind one narrow interface: the protocol, its adapter, domain XML, TPM secrets."""
