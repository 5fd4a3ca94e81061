"""The usage guide's Python facade over the core."""
