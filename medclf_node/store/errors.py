"""Errors the store raises that a caller may want to tell apart."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The store cannot be opened or used as configured (message names the config key)."""


class StoreMissing(StoreError):
    """A read-only open found no store: the node has not run yet with this configuration."""
