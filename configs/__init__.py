"""Named model configurations (installed from the repository's configs/ folder)."""
