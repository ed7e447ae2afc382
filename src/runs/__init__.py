"""The run folder: every file name in it, once (names.py); creating, taking and writing it (folder.py);
reading it back, checked (reading.py); checksummed checkpoints (checkpoints.py); the figures (plots.py).

May import: src.config, src.files, src.errors, src.signals. Imported by: everything above it (the main
loop, its extensions, analysis, sweeps, the scripts).
"""
