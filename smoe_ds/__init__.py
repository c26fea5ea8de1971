"""smoe-ds: SMoE-Dropout training on DeepSpeed expert parallelism and ZeRO."""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained`` know exported smoe-ds models."""
    try:
        from smoe_ds.models.hf import register
    except ImportError:  # transformers missing: everything but the HF export still works
        return
    register()


_register_with_transformers()
