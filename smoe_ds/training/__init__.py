"""The training runtime: engine set-up, the one training loop, the self-slimming evaluation sweep,
numerics, heap trimming and preflight checks."""
