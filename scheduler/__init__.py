"""dejavu.scheduler."""
