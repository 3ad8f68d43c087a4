"""dejavu.runtime."""
