"""Evaluation of trained models: test data formats, metrics, and the comparison report."""
