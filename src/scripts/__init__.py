"""Command-line entry points; each file runs as `python src/scripts/NAME.py`."""
