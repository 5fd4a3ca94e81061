"""Reports for people: self-contained HTML pages (inline CSS and SVG plots, nothing fetched from a network)."""
