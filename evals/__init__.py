"""selfsteer.evals."""
