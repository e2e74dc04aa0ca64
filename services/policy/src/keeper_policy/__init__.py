"""keeper_policy."""
