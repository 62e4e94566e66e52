"""replicant: a self-hosted, Replicate-compatible prediction server."""

__version__ = "0.1.0"
