"""jbl runner."""
