"""The registry of methods and their named variants (option presets of one method).

    from xm.methods.registry import create, variants
    m = create("xmore-minmax", ctx)            # XMoRe with ensemble="modal"
    m = create("xmore", ctx, k_fine=8)         # overrides on top of the preset

A method module registers its class and variants at import; `_MODULES` lists them, so
that `xm methods` shows every method without anyone importing it by hand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from xm.errors import XMError
from xm.methods.base import Context, Method

_MODULES = ("xm.methods.clip", "xm.methods.xmore", "xm.methods.reco", "xm.methods.coder", "xm.methods.tip_adapter")


@dataclass(frozen=True)
class Variant:
    name: str
    method: type[Method]
    preset: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


_VARIANTS: dict[str, Variant] = {}
_loaded = False


def register(method: type[Method], variants: dict[str, tuple[dict[str, Any], str]] | None = None) -> type[Method]:
    """Register `method` under its own name (default options) and each named preset."""
    method.resolve_options({})  # the defaults must validate
    _VARIANTS[method.name] = Variant(method.name, method, {}, method.summary)
    for name, (preset, summary) in (variants or {}).items():
        method.resolve_options(preset)
        _VARIANTS[name] = Variant(name, method, dict(preset), summary)
    return method


def unregister(name: str) -> None:
    """Forget a method and every variant of it (a plug-in registered by a test, when it ends)."""
    variant = _VARIANTS.get(name)
    if variant is not None:
        for key in [k for k, v in _VARIANTS.items() if v.method is variant.method]:
            del _VARIANTS[key]


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in _MODULES:
            importlib.import_module(module)
        _loaded = True


def variants() -> dict[str, Variant]:
    _load()
    return dict(_VARIANTS)


def get(name: str) -> Variant:
    _load()
    if name not in _VARIANTS:
        raise XMError(f"method {name!r}: unknown; choose from {', '.join(_VARIANTS)} (see `xm methods`)")
    return _VARIANTS[name]


def create(name: str, ctx: Context, strict: bool = True, **overrides: Any) -> Method:
    """An instance of the named method or variant, its preset under `overrides`.

    With `strict=False`, overrides the method does not take are ignored (a benchmark's
    protocol sets retrieval switches for all methods at once; only X-MoRe reads them).
    """
    v = get(name)
    if not strict:
        known = {o.name for o in v.method.options}
        overrides = {k: val for k, val in overrides.items() if k in known}
    method = v.method(ctx, **{**v.preset, **{k: val for k, val in overrides.items() if val is not None}})
    method.variant = name  # type: ignore[attr-defined]
    return method
