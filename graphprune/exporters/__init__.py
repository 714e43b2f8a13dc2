"""graphprune.exporters."""
