"""Reproducible recipes that build the models shipped in ``models/`` (data -> train -> evaluate -> export)."""
