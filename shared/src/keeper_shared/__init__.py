"""keeper_shared."""
