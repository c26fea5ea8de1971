"""smoe-ds: SMoE-Dropout training on DeepSpeed expert parallelism and ZeRO."""

__version__ = "0.1.0"
