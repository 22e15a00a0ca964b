"""Where a build's units of work run: `base.py` is the interface (`Runner`), one module per
`--distributor`, `registry.py` maps the flag's value to its runner."""
