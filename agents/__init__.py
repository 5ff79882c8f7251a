"""selfsteer.agents."""
