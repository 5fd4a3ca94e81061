"""Exported formats of a trained model."""
