"""smoe-ds: SMoE-Dropout training on DeepSpeed expert parallelism and ZeRO."""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Make the Auto classes know exported smoe-ds models: the built-in LM's (AutoModelForCausalLM)
    and converted pretrained models' (AutoModel and the task classes, see smoe_ds.hf.auto)."""
    try:
        from smoe_ds.hf.auto import register as register_converted
        from smoe_ds.models.hf import register
    except ImportError:  # transformers missing: everything but the HF export still works
        return
    register()
    register_converted()


_register_with_transformers()
