"""Watching the fleet: one read of its state (`status`), how people see it
(`statusview`, `display`) and the Prometheus exporter (`prometheus`)."""
