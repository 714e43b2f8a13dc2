"""graphprune.recipes."""
