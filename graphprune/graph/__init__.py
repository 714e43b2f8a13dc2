"""graphprune.graph."""
