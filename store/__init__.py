"""jbl store."""
