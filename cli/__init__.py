"""jbl cli."""
