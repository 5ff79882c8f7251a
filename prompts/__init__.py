"""selfsteer.prompts."""
