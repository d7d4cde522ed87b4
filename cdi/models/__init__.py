"""Model adapters, one module per family, and the alias registry."""
