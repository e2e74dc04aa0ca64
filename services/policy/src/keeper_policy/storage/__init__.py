"""Policy's Redis layer: the VM registry, key names, and the Lua scripts with their loader."""
