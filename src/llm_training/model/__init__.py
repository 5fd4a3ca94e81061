"""The decoder-only transformer and text generation."""
