"""What notebooks import: `load_main_loop` (one run), `load_runs` (a table of runs), `group_seeds` (seeds
pooled), and the run table that report.py prints (src.analysis.table).

May import: everything below it (src.main_loop's layer and down, configs). Imported by: src.scripts, and
src.sweep (to read a point's run folder).
"""
from src.analysis.load import LoadedRun, load_main_loop, read_config, run_state  # noqa: F401
from src.analysis.runs import (  # noqa: F401
    RUN_METRICS, TEST_MODELS, TEST_PREFIXES, TEST_SETS, find_runs, is_test_metric, load_runs, read_model_size,
    read_test_results, summarize_run,
)
from src.analysis.seeds import GROUP_COUNTS, GROUPED_METRICS, NOT_CONFIGURATION, group_seeds  # noqa: F401
from src.runs.names import EVAL_FILES  # noqa: F401
from src.runs.reading import (  # noqa: F401
    LOG_NUMBERS, STATUS_COUNTS, UnreadableRun, json_kind, parse_json, read_log, read_object, read_status,
)
