"""The distribution's version, in a module of its own (the upstream client sends it)."""

__version__ = "0.1.0"
