"""graphprune.testing."""
