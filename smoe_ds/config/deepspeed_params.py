"""The keyword arguments DeepSpeed hands to the optimizer and the LR scheduler it builds.

``optimizer.params`` and ``scheduler.params`` go whole to a constructor when the engine is built
(``engine._configure_basic_optimizer``, ``engine._scheduler_from_config``), so a misspelt name
there is not ignored but fails late, in a traceback, after the run folder's monitor files were
made. This module names the constructors DeepSpeed 0.19.8 may call for each ``type`` and reads
their signatures, so ``smoe_ds.config.schema`` can refuse an argument none of them takes while the
config loads.

Which classes a type may build: for ``adam`` and ``adamw``, torch's Adam or AdamW
(``torch_adam``), DeepSpeed's FusedAdam, or its DeepSpeedCPUAdam (optimizer offload), with
``adam_w_mode``, ``torch_adam``, ``fp32_optimizer_states`` and ``foreach`` taken by the engine
itself; for ``adagrad`` and ``lion`` the CPU and the fused kernel; for ``lamb`` FusedLamb; for a
``torch.optim`` name that class. The union of their arguments is accepted, so nothing the engine
would build is refused. ``muon`` and the ``mup`` optimizers (an optional package) are not judged.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

# The engine's own arguments of the Adam family, popped before the constructor is called.
ADAM_ENGINE_KEYS = ("adam_w_mode", "torch_adam", "fp32_optimizer_states", "foreach")

# DeepSpeed's optimizer name (lower case) -> the classes the engine may build for it ("module:Class").
OPTIMIZER_CLASSES = {
    "adam": (
        "torch.optim:Adam",
        "torch.optim:AdamW",
        "deepspeed.ops.adam:FusedAdam",
        "deepspeed.ops.adam:DeepSpeedCPUAdam",
    ),
    "adamw": (
        "torch.optim:Adam",
        "torch.optim:AdamW",
        "deepspeed.ops.adam:FusedAdam",
        "deepspeed.ops.adam:DeepSpeedCPUAdam",
    ),
    "adagrad": ("torch.optim:Adagrad", "deepspeed.ops.adagrad:DeepSpeedCPUAdagrad"),
    "lamb": ("deepspeed.ops.lamb:FusedLamb",),
    "lion": ("deepspeed.ops.lion:FusedLion", "deepspeed.ops.lion:DeepSpeedCPULion"),
}


def optimizer_params_problem(name: str, params: dict) -> str | None:
    """One line naming the first of ``params`` that no class optimizer ``name`` may build takes; None if all fit."""
    if "max_grad_norm" in params:
        return "optimizer.params.max_grad_norm is not an optimizer argument in DeepSpeed: set gradient_clipping instead"
    lower = name.lower()
    if lower in OPTIMIZER_CLASSES:
        classes = [c for c in map(_load, OPTIMIZER_CLASSES[lower]) if c is not None]
        extra = ADAM_ENGINE_KEYS if lower in ("adam", "adamw") else ()
    else:
        torch_class = _load(f"torch.optim:{name}")
        classes, extra = ([torch_class] if torch_class is not None else []), ()
    return _first_unknown("optimizer", name, params, classes, extra, skip=("params", "model_params"))


def scheduler_params_problem(name: str, params: dict) -> str | None:
    """One line naming the first of ``params`` that scheduler ``name``'s constructor does not take; None if all fit."""
    cls = _load(f"deepspeed.runtime.lr_schedules:{name}") or _load(f"torch.optim.lr_scheduler:{name}")
    return _first_unknown("scheduler", name, params, [cls] if cls is not None else [], (), skip=("optimizer",))


def _first_unknown(section: str, name: str, params: dict, classes: list, extra: tuple, skip: tuple) -> str | None:
    accepted = set(extra)
    for cls in classes:
        taken = _arguments(cls)
        if taken is None:  # **kwargs, or a signature that cannot be read: no verdict
            return None
        accepted |= taken
    if not classes:
        return None
    accepted -= set(skip)
    for key in params:
        if key not in accepted:
            guess = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            return (
                f"{section}.params.{key}: {section} {name} takes no such argument ({hint}it takes "
                f"{', '.join(sorted(accepted))})"
            )
    return None


def _arguments(cls: type) -> set[str] | None:
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "self"}


def _load(dotted: str) -> Any:
    """The class ``module:Class``, or None when the module or the class is not there."""
    module, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except Exception:  # an optional op whose module fails to import here
        return None
