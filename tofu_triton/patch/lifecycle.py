"""The one patch lifecycle every model family uses.

A family patches a model in place by changing the class of one module, its
*target* (the model itself, or the encoder inside a model with a head), to a
cached subclass that mixes the family's ``forward`` in front of the original
class, and by setting the family's settings (``r``, ``tofu_mode``, ...) as
plain attributes on that target. Parameters, buffers, hooks and the
``state_dict`` are untouched, so unpatching is swapping the class back and
deleting the settings.

This module owns what every family shares: validating new settings and
rolling back to the previous ones when they are refused, the class swap,
finding the patched module of any model, refusing mistyped settings
(:class:`Patched`), :func:`unpatch`, :func:`is_patched`, :func:`plan` and
:func:`settings`. A family describes itself once with a :class:`Family` and
calls :func:`apply`.
"""
import difflib
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from torch import nn


class Family(NamedTuple):
    """What the lifecycle needs to know about one model family."""

    name: str  # what users call: tofu_triton.patch.<name>(model, ...)
    settings: Tuple[str, ...]  # attributes the family sets on its target
    target: Callable[[nn.Module], nn.Module]  # model -> the module whose class is swapped
    validate: Callable[[nn.Module], None]  # target -> None; TypeError/ValueError on bad settings
    plan: Callable[[nn.Module, Optional[int]], list]  # (target, n_tokens or None) -> per-layer plan
    # target -> [(submodule, mixin, {attribute: value})]: submodules whose class is
    # swapped too (and the fixed, structural attributes they get, whose names the
    # mixin lists in ``_tofu_attrs`` so unpatch removes them), for families whose
    # work happens deep inside the target (diffusers' transformer blocks).
    parts: Optional[Callable[[nn.Module], List[Tuple[nn.Module, type, Dict[str, object]]]]] = None


class Patched:
    """Marker base of every patched class (set on the class by :func:`apply`):
    ``_tofu_base`` is the original class, ``_tofu_family`` the Family.

    Settings are plain attributes of the patched module (``model.r = 8``), so
    a mistyped one (``unet.rato = 0.3``) would be a new attribute nobody reads.
    On the module that carries the settings, setting a *new* attribute whose
    name looks like a setting raises AttributeError naming the setting meant
    (see :func:`setting_typo`); every other attribute (parameters, submodules,
    existing attributes, private ``_names``, names unlike any setting) is set
    as by ``nn.Module`` itself. An attribute of your own with such a name can
    be set before patching (an existing attribute is never refused).
    """

    _tofu_base: type
    _tofu_family: Family

    def __setattr__(self, name: str, value) -> None:
        settings = type(self)._tofu_family.settings
        # Cheapest tests first: torch and the model libraries set attributes often;
        # a part (a patched submodule) carries no settings and is never checked.
        if name in settings or name[:1] == "_" or settings[0] not in self.__dict__ or hasattr(self, name):
            super().__setattr__(name, value)
            return
        meant = setting_typo(name, settings)
        if meant is None:
            super().__setattr__(name, value)
            return
        hint = f"did you mean {meant!r}?" if meant else f"the settings are {', '.join(settings)}"
        raise AttributeError(
            f"{name!r} is not a setting of this patched {type(self)._tofu_base.__name__}; {hint} (a new attribute "
            "named like a setting is refused on a patched model: set your own before patching, or rename it)")


def setting_typo(name: str, settings: Tuple[str, ...]) -> Optional[str]:
    """The setting a new attribute ``name`` was probably meant to be, or None if it looks like no setting.

    Refused (so ``model.<name> = ...`` raises on a patched model): a setting's name
    in another case (``R``); a patch() argument named without its ``tofu_`` prefix
    (``mode`` for ``tofu_mode``); a name within difflib's 0.8 similarity of a
    setting (``rato``, ``tofu_mdoe``); any other ``tofu_*`` name, the prefix being
    the settings' (returns "" when no setting is close).
    """
    lowered = name.lower()
    for candidate in (lowered, "tofu_" + lowered):
        if candidate in settings:
            return candidate
    close = difflib.get_close_matches(lowered, settings, n=1, cutoff=0.8)
    if close:
        return close[0]
    return "" if lowered.startswith("tofu_") else None


_FAMILIES: List[Family] = []
_CLASSES: Dict[Tuple[type, type], type] = {}


def register(family: Family) -> Family:
    """Make a family known to :func:`unpatch`, :func:`is_patched` and :func:`plan`."""
    if all(f.name != family.name for f in _FAMILIES):
        _FAMILIES.append(family)
    return family


def _patched_class(base: type, mixin: type, family: Family, module: str) -> type:
    key = (base, mixin)
    if key not in _CLASSES:
        name = f"Tofu{base.__name__}"
        cls = type(name, (mixin, Patched, base), {"_tofu_base": base, "_tofu_family": family, "__module__": module})
        cls.__qualname__ = name
        # A module-level name lets pickle find the class of a patched model.
        setattr(sys.modules[module], name, cls)
        _CLASSES[key] = cls
    return _CLASSES[key]


def apply(model: nn.Module, family: Family, mixin: type, values: Dict[str, object]) -> nn.Module:
    """Patch ``model`` in place with ``values`` (one per ``family.settings``), or update them.

    The settings are validated on the target before anything else changes;
    if the family refuses them, the target is left exactly as it was (its
    previous settings restored, or none set) and the error propagates.
    Returns ``model``.
    """
    target = family.target(model)
    if isinstance(target, Patched) and type(target)._tofu_family.name != family.name:
        raise TypeError(f"this model is already patched by tofu_triton.patch.{type(target)._tofu_family.name}; "
                        "call tofu_triton.patch.unpatch(model) first")
    previous = {name: getattr(target, name) for name in family.settings} if isinstance(target, Patched) else None
    for name in family.settings:
        setattr(target, name, values[name])
    try:
        family.validate(target)
    except (TypeError, ValueError):
        for name in family.settings:
            if previous is None:
                target.__dict__.pop(name, None)
            else:
                setattr(target, name, previous[name])
        raise
    if previous is None:
        for part, part_mixin, attrs in family.parts(target) if family.parts else ():
            for name, value in attrs.items():
                setattr(part, name, value)
            part.__class__ = _patched_class(type(part), part_mixin, family, part_mixin.__module__)
        target.__class__ = _patched_class(type(target), mixin, family, mixin.__module__)
    return model


def patched_module(model: nn.Module) -> Optional[nn.Module]:
    """The module of ``model`` that carries the patch (``model`` itself or its
    target in some registered family), or None if it is not patched."""
    if isinstance(model, Patched):
        return model
    for family in _FAMILIES:
        try:
            target = family.target(model)
        except (TypeError, AttributeError):
            continue
        if isinstance(target, Patched):
            return target
    return None


def is_patched(model: nn.Module) -> bool:
    """True if any family has patched ``model`` (or the encoder inside it)."""
    return patched_module(model) is not None


def require_patched(model: nn.Module) -> nn.Module:
    """The patched module of ``model``; TypeError naming what to call if there is none."""
    target = patched_module(model)
    if target is None:
        raise TypeError(f"{type(model).__name__} is not patched; call tofu_triton.patch.timm(model), "
                        ".transformers(model) or .diffusers(model) first")
    return target


def unpatch(model: nn.Module) -> nn.Module:
    """Undo any family's patch in place and return ``model``.

    On a model that was never patched (or is unpatched already) this is a
    no-op on purpose, with no warning: clean-up code (a ``finally``, a
    benchmark that unpatches before each variant) can call it without
    checking first. :func:`is_patched` says whether there is a patch to undo.
    """
    target = patched_module(model)
    if target is not None:
        family = type(target)._tofu_family
        for part in list(target.modules())[1:]:
            if isinstance(part, Patched) and type(part)._tofu_family is family:
                for name in getattr(type(part), "_tofu_attrs", ()):
                    part.__dict__.pop(name, None)
                part.__class__ = type(part)._tofu_base
        target.__class__ = type(target)._tofu_base
        for name in family.settings:
            target.__dict__.pop(name, None)
    return model


def settings(model: nn.Module) -> Dict[str, object]:
    """The current settings of a patched model, by attribute name."""
    target = require_patched(model)
    return {name: getattr(target, name) for name in type(target)._tofu_family.settings}


def family_of(model: nn.Module) -> Family:
    """The Family that patched ``model``."""
    return type(require_patched(model))._tofu_family


def plan(model: nn.Module, n_tokens: Optional[int] = None) -> list:
    """The per-layer plan (:class:`tofu_triton.schedule.LayerPlan` list) a
    patched model follows for ``n_tokens`` input tokens (prefix included;
    default: what the model's configured input size gives, where it has one)."""
    target = require_patched(model)
    return type(target)._tofu_family.plan(target, n_tokens)
