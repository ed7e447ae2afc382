"""Extensions of the main loop, in Blocks' vocabulary on ignite's events: each a small class whose
`attach(engine)` adds its handlers with their triggers (`every=`, `once=`, `EPOCH_COMPLETED`), one concern
per module.

    saveload.Checkpoint    load on start; save every N batches, every N seconds, at epoch ends and the end
    stopping.StopOnSignal  a stop signal: checkpoint after this step, stop
    ema.EMA                an exponential moving average of the weights, in the checkpoint
    monitoring.Monitors    curves.png and TensorBoard
    search_trial.SearchTrial  a search's trial: each epoch's metric to the study, stopped where the pruner says

May import: src.evaluation's layer and below (src.runs, src.training, src.files, src.errors, src.signals).
Imported by: src.main_loop and the layers above it.
"""
from src.extensions.ema import EMA  # noqa: F401
from src.extensions.monitoring import Monitors  # noqa: F401
from src.extensions.saveload import Checkpoint, disk_errors_stop_training  # noqa: F401
from src.extensions.search_trial import SearchTrial  # noqa: F401
from src.extensions.stopping import StopOnSignal  # noqa: F401
