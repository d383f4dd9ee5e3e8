"""Metrics and logs. Observability never breaks serving: a failing hook is logged, not raised."""
