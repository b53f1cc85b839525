"""Integrations with other libraries (imported lazily; optional dependencies)."""
