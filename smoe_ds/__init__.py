"""smoe-ds: SMoE-Dropout training on DeepSpeed expert parallelism and ZeRO."""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


# Each registers its model types with transformers' Auto classes as it is imported: the built-in
# LM's (AutoModelForCausalLM) and converted pretrained models' (AutoModel and the task classes).
_REGISTERING_MODULES = ("smoe_ds.models.transformers_lm", "smoe_ds.hf.auto")


def _register_with_transformers() -> None:
    """Import the registering modules. One already being imported (transformers' import started
    inside it) comes back half-built from ``import_module`` and registers when it finishes."""
    for name in _REGISTERING_MODULES:
        importlib.import_module(name)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Registers with transformers right after transformers' own import, whoever imports it.

    Importing transformers' model classes (what registering needs) takes 2-5 s, and every rank of
    every training run imports smoe_ds without ever touching transformers. So ``import smoe_ds``
    registers at once only where transformers is already loaded; elsewhere this finder, first on
    ``sys.meta_path``, wraps transformers' loader so that registering follows its import.
    ``import smoe_ds`` then ``AutoModel.from_pretrained`` works as before, in either order.
    Where transformers is not installed, its import fails as it would without smoe_ds.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from finding us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_register(module) -> None:
            load(module)
            _register_with_transformers()

        spec.loader.exec_module = load_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
