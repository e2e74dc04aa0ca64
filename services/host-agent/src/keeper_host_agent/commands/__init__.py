"""The handlers of the commands the host agent takes from the bus, one module per family."""
