"""What DeepSpeed reads from a config, asked of the installed DeepSpeed itself.

DeepSpeed ignores a top-level key it does not read, so a typo such as ``zero_optimisation``
trains silently without ZeRO. smoe-ds refuses such keys (``smoe_ds.config.schema``); this module says
which keys, fields and names DeepSpeed accepts, so that the refusal follows the installed
version (setup.cfg pins 0.19.8) instead of a list kept by hand.

How each answer is derived:

- **Top-level keys** (``known_keys``): DeepSpeed's own reader of a config dict,
  ``DeepSpeedConfig._initialize_params`` (then ``_do_warning_check``, which reads
  ``vocabulary_size``), is run on a dict that records every key looked up in it (``get``,
  ``[]``, ``in``, ``in .keys()``). The recorded keys are exactly the top-level keys DeepSpeed
  reads. Collecting the name constants of ``deepspeed.runtime.constants`` and friends instead
  would over-accept: most of them name fields inside sections (``stage``, ``enabled``, ``type``).
  This trace starts from an empty config, so it sees the top-level reads only. Two keys are
  added by hand (``READ_BY_INITIALIZE``) because ``deepspeed.initialize`` reads them before it
  builds the config object, outside the traced parser.
- **Removed keys** (``removed``): 0.19.8 refuses sections of removed features (``amp``,
  ``sparse_attention``, ``elasticity``, ...) with a reason; its own check
  (``_reject_removed_config_keys``) is asked, and its reason is passed on.
- **Fields inside sections** (``section_problem``): the section alone is parsed by the same
  ``_initialize_params``, which builds DeepSpeed's pydantic models from it. Those models
  (``DeepSpeedConfigModel``) forbid unknown fields and check types, so a typo or a bad value
  raises a ``ValidationError``, turned here into one line naming the field. Parsing one section at
  a time tells which section an error belongs to. The sections validated this way in 0.19.8 are
  zero_optimization, fp16, bf16 (and its old name bfloat16), the monitors (tensorboard, wandb,
  csv_monitor, comet), comms_logger, compile, hybrid_engine, tensor_parallel and
  weight_quantization; DeepSpeed reads the others (activation_checkpointing, flops_profiler, aio,
  checkpoint, ...) with ``dict.get`` (next item).
- **Fields of the other sections** (``unread_problem``): DeepSpeed reads them with ``dict.get`` and
  ignores what it does not ask for. The section alone is parsed again with every nested object a
  recorder: a field of the user's that no lookup asked for is refused, with the closest field that
  was asked for. A reader that iterates an object takes all its fields, an object handed to a
  pydantic model is judged by that model, and a trace that breaks (a reader that copies the
  object) gives no verdict, so this can miss a typo but not refuse a field DeepSpeed reads.
- **Value types** (``top_level_problem``, and inside ``unread_problem``): ``get(key, default)``
  shows DeepSpeed's default; a value not of its type (a string where DeepSpeed expects true or
  false, a number or an integer) would be used as it is and fail or mislead later, so it is refused.
- **Optimizer and scheduler types** (``optimizer_problem``, ``scheduler_problem``): mirrors
  what the engine does with them. ``DeepSpeedConfig`` lower-cases an optimizer name found in
  ``DEEPSPEED_OPTIMIZERS``; any other name is looked up, case and all, in ``torch.optim``
  (``engine._configure_basic_optimizer``). A scheduler is one of ``lr_schedules``'
  ``VALID_LR_SCHEDULES`` or a class of ``torch.optim.lr_scheduler`` (``engine._scheduler_from_config``).

DeepSpeed is imported on first use (with torch, a second or two); after that a section is checked
in well under a millisecond.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
import typing
from collections.abc import KeysView
from typing import Any

DOCS = "https://www.deepspeed.ai/docs/config-json/"

# deepspeed.initialize reads these two before it builds the DeepSpeedConfig (to lay out a data x
# sequence parallel mesh of devices), so the trace of the config's parser cannot see them;
# DeepSpeedConfig.__init__ reads sequence_parallel_size too, but only once a process group is up.
READ_BY_INITIALIZE = ("data_parallel_size", "sequence_parallel_size")

# How a pydantic error type reads in a message: "<field>: must be <this>, got <value>".
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}
_LIST_AT_MOST = 12  # an unknown field's message lists the known ones when there are at most this many


class _ReadRecorder(dict):
    """A dict that notes every key looked up in it, however the lookup is spelled, with the default
    each ``get`` offered; a reader that iterates it (``items()``, ``for``, ``**``) takes every key.

    Built without entries it holds one key that nothing reads: some readers test the whole dict
    first (``if param_dict and "autotuning" in param_dict``), so an empty one would hide their keys.
    Built from a section, its nested objects are recorders too (``traced``)."""

    def __init__(self, entries: dict | None = None) -> None:
        super().__init__({"(no key DeepSpeed reads)": None} if entries is None else entries)
        self.read: set[str] = set()
        self.defaults: dict[str, Any] = {}  # key -> the default DeepSpeed's get() offered for it
        self.iterated = False

    @classmethod
    def traced(cls, section: dict) -> _ReadRecorder:
        return cls({k: cls.traced(v) if isinstance(v, dict) else v for k, v in section.items()})

    def get(self, key, default=None):
        self.read.add(key)
        self.defaults.setdefault(key, default)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def __iter__(self):
        self.iterated = True
        return super().__iter__()

    def items(self):
        self.iterated = True
        return super().items()

    def values(self):
        self.iterated = True
        return super().values()

    def keys(self):
        return KeysView(self)  # `key in d.keys()` then goes through __contains__, iterating it through __iter__


def _parser():
    """A DeepSpeedConfig before its __init__ (which needs a world size and checks batch sizes):
    its ``_initialize_params`` is DeepSpeed's reader of a config dict, section by section."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return object.__new__(DeepSpeedConfig)


def version() -> str:
    import deepspeed

    return deepspeed.__version__


@functools.cache
def _top_level_trace() -> _ReadRecorder:
    recorder = _ReadRecorder()
    parser = _parser()
    parser._initialize_params(recorder)
    parser._param_dict, parser.global_rank = recorder, 0
    parser._do_warning_check()
    return recorder


def known_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed reads (see the module docstring for how)."""
    return frozenset(_top_level_trace().read) | frozenset(READ_BY_INITIALIZE)


def value_problem(path: str, value: Any, default: Any) -> str | None:
    """One line when ``value`` is not of the type of DeepSpeed's ``default`` for it (a bool, a
    number, an integer or a string; None and containers say nothing); None when it is."""
    if default is None or isinstance(default, (dict, list, tuple)):
        return None
    if isinstance(default, bool):
        fits, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        fits, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        fits, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        fits, wanted = isinstance(value, str), "a string"
    else:
        return None
    return None if fits else f"{path}: must be {wanted} (DeepSpeed's default is {default!r}), got {_short(value)}"


def top_level_problem(key: str, value: Any) -> str | None:
    """``value`` of top-level ``key`` against the type of DeepSpeed's default for it (``value_problem``)."""
    return value_problem(key, value, _top_level_trace().defaults.get(key))


def unread_problem(key: str, value: Any) -> str | None:
    """One line naming a field of section ``key`` that DeepSpeed does not read, or whose value is
    not of the type of DeepSpeed's default for it; None when every field is read and fits.

    The section is parsed alone by DeepSpeed's reader with every nested object a ``_ReadRecorder``.
    A reader that iterates an object takes all its fields; a reader that copies one, or anything
    else that stops the trace, leaves the section unjudged, so the check can miss a typo but never
    refuses what DeepSpeed reads. ``optimizer`` and ``scheduler`` are left out: their ``params``
    go whole to a constructor (``smoe_ds.config.deepspeed_params`` checks them)."""
    if not isinstance(value, dict) or key in ("optimizer", "scheduler"):
        return None
    section = _ReadRecorder.traced(copy.deepcopy(value))
    try:
        _parser()._initialize_params({key: section})
    except Exception:  # the trace could not follow DeepSpeed's reader: no verdict
        return None
    return _first_unread(key, section)


def _first_unread(path: str, section: _ReadRecorder) -> str | None:
    # Nothing looked up and not iterated: DeepSpeed handed the object to one of its pydantic models,
    # which read a dict's entries below Python's reach. Those models judge their fields themselves
    # (``section_problem``), so there is nothing to say here.
    judged = section.iterated or not section.read
    for field, value in dict.items(section):  # not section.items(), which would count as DeepSpeed reading it
        where = f"{path}.{field}"
        if not judged and field not in section.read:
            guess = _closest(field, sorted(section.read))
            hint = f"did you mean {guess!r}?" if guess else f"DeepSpeed {version()} reads {_names(section.read)}"
            return f"{where}: unknown field ({hint})"
        problem = value_problem(where, value, section.defaults.get(field))
        if problem is None and isinstance(value, _ReadRecorder):
            problem = _first_unread(where, value)
        if problem is not None:
            return problem
    return None


def _names(keys) -> str:
    names = sorted(str(k) for k in keys)
    if not names:
        return "none of its fields"
    return ", ".join(names) if len(names) <= _LIST_AT_MOST else f"{', '.join(names[:_LIST_AT_MOST])}, ..."


def removed(key: str) -> str | None:
    """DeepSpeed's reason for refusing ``key``, the section of a feature it removed; None otherwise."""
    from deepspeed.runtime.config import DeepSpeedConfigError, _reject_removed_config_keys

    try:
        _reject_removed_config_keys({key: None})
    except DeepSpeedConfigError as e:
        return _one_line(e)
    return None


def section_problem(key: str, value: Any) -> str | None:
    """One line saying what DeepSpeed refuses in the top-level entry ``key: value``; None if nothing."""
    from deepspeed.runtime.config import _reject_removed_config_keys
    from pydantic import ValidationError

    section = {key: copy.deepcopy(value)}  # the parser adds keys to some of the dicts it reads
    try:
        _reject_removed_config_keys(section)  # removed fields inside zero_optimization
        _parser()._initialize_params(section)
    except ValidationError as e:
        return _validation_line(key, e)
    except (TypeError, AttributeError, KeyError) as e:  # DeepSpeed tripped over a value of the wrong shape
        return f"{key}: DeepSpeed cannot read {_short(value)} here ({type(e).__name__}: {_one_line(e)})"
    except Exception as e:  # DeepSpeed's own checks: ValueError, AssertionError, DeepSpeedConfigError
        return f"{key}: {_one_line(e)}"
    return None


@functools.cache
def optimizer_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DeepSpeed's optimizers, lower-case as it compares them; torch.optim's optimizer classes)."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return tuple(DEEPSPEED_OPTIMIZERS), _classes(torch.optim, torch.optim.Optimizer)


@functools.cache
def scheduler_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DeepSpeed's LR schedules; torch.optim.lr_scheduler's scheduler classes)."""
    import torch
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return tuple(VALID_LR_SCHEDULES), _classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)


def optimizer_problem(name: Any) -> str | None:
    """Why DeepSpeed would not build ``optimizer.type`` = ``name``; None when it would."""
    own, torch_classes = optimizer_names()
    if isinstance(name, str) and (name.lower() in own or name in torch_classes):
        return None
    return _type_line("optimizer", name, own, " (any case)", "torch.optim", torch_classes)


def scheduler_problem(name: Any) -> str | None:
    """Why DeepSpeed would not build ``scheduler.type`` = ``name``; None when it would."""
    own, torch_classes = scheduler_names()
    if isinstance(name, str) and (name in own or name in torch_classes):
        return None
    return _type_line("scheduler", name, own, "", "torch.optim.lr_scheduler", torch_classes)


# -- helpers ------------------------------------------------------------------------------------


def _classes(module, base: type) -> tuple[str, ...]:
    """The public subclasses of ``base`` in ``module``, by name, without ``base`` itself."""
    return tuple(
        sorted(
            name
            for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, base) and obj is not base and not name.startswith("_")
        )
    )


def _type_line(section: str, name: Any, own, own_note: str, torch_module: str, torch_classes) -> str:
    """``section.type`` refused, in one line: the closest name, then every name DeepSpeed builds."""
    if name is None:
        head = f"{section}.type is not set"
    else:
        head = f"unknown {section}.type {name!r}"
        guess = _closest(name, [*own, *torch_classes], case_sensitive=False) if isinstance(name, str) else None
        if guess:
            head += f" (did you mean {guess!r}?)"
    return (
        f"{head}: DeepSpeed {version()} builds {', '.join(own)}{own_note}, "
        f"or a {torch_module} class ({', '.join(torch_classes)})"
    )


def _closest(word: str, candidates, case_sensitive: bool = True) -> str | None:
    """The candidate closest to ``word`` (difflib), or None when none is close."""
    if case_sensitive:
        found = difflib.get_close_matches(word, list(candidates), n=1)
        return found[0] if found else None
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)  # the first spelling wins: DeepSpeed's own before torch's
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return by_lower[found[0]] if found else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validation_line(key: str, err) -> str:
    """The first error of a pydantic ValidationError as ``section.field: problem``."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    # Most models are built from the section's dict, so their paths start inside it; the monitors'
    # model is built from all four monitor sections, so its paths start with the section's name.
    path = ".".join(loc if loc[:1] == (key,) else (key, *loc))
    kind = first["type"]
    if kind == "extra_forbidden":
        line = f"{path}: unknown field ({_field_hint(err.title, first['loc'])})"
    else:
        if kind in _EXPECTED:
            text = f"must be {_EXPECTED[kind]}"
        elif kind in ("enum", "literal_error"):
            text = f"must be {_dedupe_choices(first.get('ctx', {}).get('expected', ''))}"
        else:
            text = re.sub(r"^(Value error|Assertion failed), ", "", first["msg"]).replace("Input should", "must", 1)
            text = text[:1].lower() + text[1:]
        value = first.get("input")
        scalar = value is None or isinstance(value, (str, int, float, bool))
        line = f"{path}: {text}" + (f", got {_short(value)}" if scalar and kind != "missing" else "")
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return " ".join(line.split())


def _field_hint(title: str, loc: tuple) -> str:
    """'did you mean ...?' for an unknown field at ``loc`` of the model named ``title``, else where to look."""
    models = _models_named(title)
    for part in loc[:-1]:  # down to the model that holds the unknown field
        inner = [sub for m in models if (f := _field(m, part)) is not None for sub in _models_in(f.annotation)]
        models = inner or models  # a list index or dict key: the same model(s) hold the next part
    names = sorted({n for m in models for name, f in m.model_fields.items() for n in (name, f.alias) if n})
    guess = _closest(str(loc[-1]), names)
    if guess:
        return f"did you mean {guess!r}?"
    if names and len(names) <= _LIST_AT_MOST:
        return f"known fields: {', '.join(names)}"
    where = f"the fields of DeepSpeed's {models[0].__name__}" if models else "DeepSpeed's config docs"
    return f"see {where}, {DOCS}"


def _models_named(title: str) -> list[type]:
    """The pydantic model classes called ``title`` (a ValidationError names its model only by name)."""
    from pydantic import BaseModel

    found, todo = [], [BaseModel]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__ == title:
            found.append(cls)
    return found


def _field(model: type, name: str):
    fields = model.model_fields
    if name in fields:
        return fields[name]
    return next((f for f in fields.values() if f.alias == name), None)


def _models_in(annotation) -> list[type]:
    """The pydantic models an annotation can hold (``Optional[M]``, ``list[M]``, ``dict[str, M]`` ...)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _dedupe_choices(expected: str) -> str:
    """pydantic's "0, 1, 2, 3 or 3" (an enum with an alias) as "0, 1, 2 or 3"."""
    choices = list(dict.fromkeys(part for part in re.split(r", | or ", expected) if part))
    if len(choices) < 2:
        return expected
    return f"{', '.join(choices[:-1])} or {choices[-1]}"
