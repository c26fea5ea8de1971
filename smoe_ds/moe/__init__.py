"""SMoE-Dropout's mixture-of-experts pieces: router, k schedules, experts and the layer."""
