"""graphprune.models."""
