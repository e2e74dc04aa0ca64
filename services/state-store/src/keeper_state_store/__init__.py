"""keeper_state_store."""
