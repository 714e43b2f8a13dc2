"""graphprune.eval."""
