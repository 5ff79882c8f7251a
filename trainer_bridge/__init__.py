"""selfsteer.trainer_bridge."""
