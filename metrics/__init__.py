"""Prometheus metrics and structured logging for sandpool."""

from metrics.prometheus import Metrics

__all__ = ["Metrics"]
