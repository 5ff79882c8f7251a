"""selfsteer.graphs."""
