"""Models: the built-in decoder-only language model."""
