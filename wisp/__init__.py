"""Wisp: persistent Linux sandboxes ("sprites") that speak the Sprites v1 API."""

__version__ = "0.1.0"
__all__ = ["__version__"]
