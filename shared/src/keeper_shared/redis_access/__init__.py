"""Redis as every service reaches it: the connection, key names, reply helpers."""
