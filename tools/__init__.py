"""selfsteer.tools."""
