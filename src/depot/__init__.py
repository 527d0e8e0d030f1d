"""depot: a distributed read-through cache for AI data."""

__version__ = "0.1.0"
