"""Model factory."""
