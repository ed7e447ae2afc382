"""make bench's library: timing (src/bench/timing.py) and the per-epoch fixed costs (src/bench/epoch_costs.py)
that src/scripts/bench.py and bench_models.py report.

May import: src.main_loop and everything below it, configs. Imported by: src.scripts (the bench scripts).
"""
