"""The package version, in a module of its own so that every layer may read it (graftcore/__init__.py
imports the public API)."""

__version__ = "0.2.0"
