"""The experiment pipeline: recipes, runners, scoring, the `demo` and `bench` commands, tables and plots.

It uses the library and nothing in the library uses it (only :mod:`unsc_lightning.cli`
dispatches to it); the import-linter contracts in ``pyproject.toml`` keep it that way.
"""
