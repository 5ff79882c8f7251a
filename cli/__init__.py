"""selfsteer.cli."""
