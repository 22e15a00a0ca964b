"""`xm methods`: every registered method and variant, what it needs, its options."""

from __future__ import annotations

import typer

from xm.cli.app import app
from xm.cli.output import console, print_json, table


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """List each method: what it needs from an index, its options, whether it trains or fits."""
    from xm.methods.protocols import PROTOCOLS
    from xm.methods.registry import variants

    vs = variants()
    if as_json:
        print_json({name: {"method": v.method.name, "preset": v.preset, "summary": v.summary,
                           "needs_memory": v.method.needs_memory, "trains": v.method.trains_for(v.method.resolve_options(v.preset)), "few_shot": v.method.few_shot,
                           "stream": v.method.stream,
                           "options": {o.name: {"default": o.default, "help": o.help, "choices": o.choices} for o in v.method.options}}
                    for name, v in vs.items()} | {"_protocols": PROTOCOLS})
        return
    console.print(table("methods (variants are option presets of one method)", ["name", "method", "preset", "needs", "kind", "summary"], [
        (name, v.method.name, ", ".join(f"{k}={val}" for k, val in v.preset.items()),
         "index" if v.method.needs_memory else "encoder only",
         ", ".join(k for k, on in (("trained (xm train)", v.method.trains_for(v.method.resolve_options(v.preset))), ("few-shot (fit)", v.method.few_shot),
                                   ("stream-dependent", v.method.stream)) if on) or "zero-shot",
         v.summary) for name, v in vs.items()]))
    seen = set()
    for v in vs.values():
        if v.method in seen or not v.method.options:
            continue
        seen.add(v.method)
        console.print(table(f"{v.method.name} options (--opt NAME=VALUE)", ["option", "default", "choices", ""], [
            (o.name, repr(o.default), ", ".join(map(str, o.choices or ())), o.help) for o in v.method.options]))
    console.print(table("protocols (--protocol)", ["name", "method switches", "templates", "class names", "seeds"], [
        (n, ", ".join(f"{k}={val}" for k, val in p["method"].items()), p["templates"] or "--templates", p["classnames"], p["seeds"])
        for n, p in PROTOCOLS.items()]))
