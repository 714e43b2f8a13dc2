"""graphprune.passes."""
