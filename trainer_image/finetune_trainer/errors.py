"""Errors that end a run with a permanent exit code (retrying cannot help)."""

from __future__ import annotations


class ConfigError(ValueError):
    """The job's spec cannot be carried out with this model or data (message names the field)."""
