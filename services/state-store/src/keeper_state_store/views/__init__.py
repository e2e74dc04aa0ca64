"""Read-only answers to operators' queries (``state.describe``): what the store holds,
shown as the typed views of :mod:`keeper_shared.messages.queries`, so no tool reads the
store's Redis keys or unpacks its version metadata."""
