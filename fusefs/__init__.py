"""jbl fusefs."""
