"""dejavu.workers."""
