"""graphprune.bench."""
