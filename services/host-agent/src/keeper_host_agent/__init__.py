"""keeper_host_agent."""
