"""dejavu.kernels."""
