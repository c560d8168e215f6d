"""Config schemas and the one validation step every entry point runs before any work."""

from branchmerge.config.validate import ConfigError, validate

__all__ = ["ConfigError", "validate"]
