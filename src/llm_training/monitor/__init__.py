"""Sinks of the event bus: console progress, the system log, metrics.jsonl."""
