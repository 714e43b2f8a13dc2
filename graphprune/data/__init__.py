"""graphprune.data."""
