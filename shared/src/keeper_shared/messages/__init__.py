"""Message models: one module per family, all carried in one :class:`Envelope`."""
