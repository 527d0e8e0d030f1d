"""Observability of depot's daemons: Prometheus metrics (``metrics``)."""
