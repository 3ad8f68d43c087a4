"""dejavu.tools."""
