"""Data pipeline: raw Amazon reviews -> atomic files -> feature files."""
