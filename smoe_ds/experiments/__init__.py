"""Experiments built on the trainer: each trains several configurations and compares them."""
