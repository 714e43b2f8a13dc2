"""graphprune.kernels."""
