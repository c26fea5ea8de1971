"""Benchmarks: the layer, end to end, memory, overlap and packing. Each prints a table and writes JSON."""
