"""Bus-facing handlers of the store's events and commands, one module per command family."""
