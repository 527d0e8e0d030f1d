"""Types, errors, configuration and async helpers used by every other layer."""
