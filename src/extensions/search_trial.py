"""SearchTrial: a run started as one trial of a search (src/scripts/search.py sets SEARCH_TRIAL in its
environment) reports its validation metric to the study after each epoch's checkpoint, and stops, with that
checkpoint and not finished, where the study's pruner says so. Without SEARCH_TRIAL (the runner started by
hand on a trial's folder) a run is an ordinary run: it trains on to n_epochs, exactly as if never pruned.

The reports come from inside the run, so trials on Slurm reach the shared storage without the search's driver.
A resumed trial first sends the epochs its log holds that the study lacks (a kill can fall between a checkpoint
and its report), then asks the pruner again, so a kill never lets a trial past a rung it would have stopped at
(except a kill in the instant between the pruner's own record of a rung and its answer).

Also here, for the driver and the run alike: the storage and the pruner, built from what the link names.
"""
import json
import os
from dataclasses import asdict, dataclass

from ignite.engine import Events

from src.errors import RunError, UsageError

ENVIRONMENT = "SEARCH_TRIAL"
PRUNERS = ("asha", "hyperband", "median", "none")
REDUCTION_FACTOR = 3  # ASHA's and Hyperband's: a third of the trials go on at each rung (1, 3, 9, 27... epochs)
MEDIAN_STARTUP_TRIALS = 5  # the median pruner judges once this many trials have finished
SQLITE_WAIT_SECONDS = 60  # a job's report waits this long for another process's write to the SQLite file


@dataclass(frozen=True)
class TrialLink:
    """What a trial's run needs to reach its study: where it is, which trial, what to report, how to prune."""
    storage: str
    study: str
    trial: int  # the trial's number in the study
    metric: str  # a validation column of the log: valid_acc, valid_loss, ema_valid_acc, ema_valid_loss
    pruner: str
    min_epochs: int
    n_epochs: int

    def text(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_environment(cls):
        """The link in SEARCH_TRIAL, None without it; a malformed one is a usage error (one line)."""
        text = os.environ.get(ENVIRONMENT)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise UsageError(f"{ENVIRONMENT} in the environment is not a search trial's link ({e}); unset it") from None


def maximized(metric):
    """Accuracies are maximised, losses minimised."""
    return metric.endswith("_acc")


def journal_path(url):
    """The file of a journal storage (`journal:PATH`, `journal:///PATH`, or a path ending in .log or .journal, as
    optuna-dashboard takes one), None for a database URL."""
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        return path[2:] if path.startswith("///") else path
    return url if "://" not in url and url.endswith((".log", ".journal")) else None


def open_storage(url):
    """An Optuna storage: a journal file (`journal_path`: for clusters' shared file systems), else a database URL
    (sqlite:///PATH, postgresql://..., mysql://...)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines would go into every trial's output
    if (path := journal_path(url)) is not None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(path))
    kwargs = {"connect_args": {"timeout": SQLITE_WAIT_SECONDS}} if url.startswith("sqlite:") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(kind, min_epochs, n_epochs):
    """Optuna's pruner for `kind`, with rungs at `min_epochs` x 3^k epochs (ASHA, Hyperband)."""
    import optuna

    if kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=REDUCTION_FACTOR)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=n_epochs,
                                              reduction_factor=REDUCTION_FACTOR)
    if kind == "median":  # Optuna: "the earliest a trial can be pruned is at step == n_warmup_steps"
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=min_epochs)
    return optuna.pruners.NopPruner()


class SearchTrial:
    """After each epoch's checkpoint: its metric to the study, then the pruner's answer; pruned, the run ends.

    Attach after Checkpoint (the reported epoch is saved) and before StopOnSignal. Rank 0 talks to the study;
    under torchrun every rank stops together.
    """

    def __init__(self, link, loop):
        self.link, self.loop = link, loop
        self.storage = self.trial = self.trial_id = None
        self.pruned_at = None  # the epoch at which the pruner stopped the run

    def attach(self, engine):
        engine.add_event_handler(Events.STARTED, self.catch_up)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.report)

    def connect(self):
        import optuna

        try:
            storage = open_storage(self.link.storage)
            study = optuna.load_study(study_name=self.link.study, storage=storage,
                                      pruner=make_pruner(self.link.pruner, self.link.min_epochs, self.link.n_epochs))
            study_id = storage.get_study_id_from_name(self.link.study)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.link.trial)
        except Exception as e:  # noqa: BLE001 (any storage's error: a database, a file, a missing study)
            raise RunError(f"the search's storage does not answer ({type(e).__name__}: {str(e).splitlines()[0][:200]}"
                           "); the checkpoint is kept: rerun the search to resume this trial") from None
        self.storage, self.trial_id = storage, trial_id
        return optuna.trial.Trial(study, trial_id)

    def catch_up(self, engine):
        """A resumed trial: the epochs its log holds that the study lacks, then the pruner's answer at the last."""
        if self.loop.ranks.is_main:
            self.trial = self.connect()
        self.decide(engine, self.send(self.loop.progress.log))

    def report(self, engine):
        self.decide(engine, self.send(self.loop.progress.log[-1:]))

    def send(self, rows):
        """Rank 0: report `rows` (skipping epochs the study has) -> whether the pruner stops the trial now."""
        if not self.loop.ranks.is_main:
            return False
        from optuna.trial import TrialState

        frozen = self.storage.get_trial(self.trial_id)
        if frozen.state != TrialState.RUNNING:  # pruned (or told) already, by an earlier session of this run
            return frozen.state == TrialState.PRUNED
        for row in rows:
            value = row.get(self.link.metric)
            if value is not None and row["epoch"] not in frozen.intermediate_values:
                self.trial.report(float(value), row["epoch"])
        last = len(self.loop.progress.log)
        return 0 < last < self.link.n_epochs and self.trial.should_prune()

    def decide(self, engine, prune):
        from src.extensions.saveload import agreed

        if not agreed(self.loop.ranks, engine, prune, mid_epoch=False):
            return
        self.pruned_at = len(self.loop.progress.log)
        if self.loop.ranks.is_main:
            import optuna

            state = self.storage.get_trial(self.trial_id).state
            if state == optuna.trial.TrialState.RUNNING:
                self.trial.study.tell(self.link.trial, state=optuna.trial.TrialState.PRUNED)
        engine.terminate()
