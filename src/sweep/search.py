"""A search's study: its record in the search folder (search.json), the Optuna study in its storage, and the
trials, each an ordinary run folder SEARCH_DIR/trial_NNNN trained by the family's runner.

The driver asks the study for a trial, draws its point (`Search.prepare`), starts the runner on its folder with
SEARCH_TRIAL set (src.extensions.search_trial: the run reports each epoch and stops where the pruner says),
and when the run ends tells the study how (`Search.settle`). Everything the driver needs to go on is in the
storage and the trial folders, so a rerun after a kill continues: a trial still running in the study resumes
in its own folder as the same trial (`Search.unsettled`), never as a new one.

Exact: each trial's point is drawn by a sampler seeded from (seed, trial number), so a trial prepared again after
a kill draws the same point, and a search run one trial at a time draws the same points however often it is
killed. A trial's epochs are those of the same point trained by the plain runner: the pruner only stops it.
"""
import math
from dataclasses import dataclass
from pathlib import Path

from src.data import derive_seed
from src.errors import RunError, UsageError
from src.extensions.search_trial import TrialLink, maximized, open_storage
from src.files import LOCK_FILE, read_json, write_json
from src.runs.names import LOG
from src.runs.reading import read_log
from src.sweep.plan import _text, is_finished

RECORD = "search.json"
DATABASE = "search.db"
STUDY_NAME = "search"
SEED_SAMPLER = 7  # beside src.main_loop's and src.datasets.stream's streams of randomness (0-6)
# What makes a search itself: a rerun with any of these changed is another search, refused.
IDENTITY = ("config", "family", "space", "fixed", "metric", "pruner", "min_epochs", "sampler", "seed", "storage",
            "study")
SAMPLERS = ("tpe", "random")


def trial_folder(search_dir, number):
    return Path(search_dir) / f"trial_{number:04d}"


def trial_number(folder):
    """The number `trial_folder` gave this folder."""
    return int(Path(folder).name.split("_")[1])


def default_storage(search_dir):
    return f"sqlite:///{(Path(search_dir).resolve() / DATABASE)}"


def make_sampler(kind, seed, number):
    """The sampler that draws trial `number`: seeded from (seed, number), so that drawing it again gives the same
    point (TPE's point also depends on the trials finished before it)."""
    import optuna

    trial_seed = derive_seed(seed, SEED_SAMPLER, number) % 2**32
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed)
    return optuna.samplers.TPESampler(seed=trial_seed)


@dataclass
class Search:
    """A search folder and its study; `record` holds the IDENTITY keys plus what may change between reruns."""
    search_dir: Path
    record: dict
    dimensions: list
    fixed: dict  # key -> value, every trial's fixed overrides
    base: dict  # the named config the overrides apply to
    family: object  # the family's registry (src.config.ConfigRegistry)
    study: object = None
    storage: object = None

    @classmethod
    def load(cls, search_dir):
        """The search a folder's search.json records, its study opened (not created): for report.py."""
        from configs import family, find_config
        from src.sweep.space import parse_space

        path = Path(search_dir) / RECORD
        try:
            record = read_json(path)
            registry = family(record["family"])
            base = find_config(record["config"], record["family"])[1]
            dimensions, fixed = parse_space({**record["fixed"], **record["space"]}, registry.root)
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise RunError(f"{path} cannot be read as a search ({type(e).__name__}: {e})") from None
        search = cls(Path(search_dir), record, dimensions, fixed, base, registry)
        search.open_study(create=False)
        return search

    @property
    def url(self):
        """The storage's URL: --storage's, or the search folder's own search.db (found where the folder is now,
        so a search folder moved or copied whole still opens)."""
        return self.record["storage"] or default_storage(self.search_dir)

    @property
    def n_epochs(self):
        return {**self.base, **self.fixed}["n_epochs"]

    def check_folder(self):
        """A rerun must be the same search; a new one needs a new or empty folder."""
        path = self.search_dir / RECORD
        if path.exists():
            try:
                saved = read_json(path)
            except (OSError, ValueError, RecursionError) as e:
                raise RunError(f"{path} is damaged ({e}); fix it, or give a new search folder") from None
            if not isinstance(saved, dict):
                raise RunError(f"{path} is damaged (not a JSON object); fix it, or give a new search folder")
            changed = [key for key in IDENTITY if saved.get(key) != self.record.get(key)]
            if changed:
                shown = "; ".join(f"{key}: {saved.get(key)!r} -> {self.record.get(key)!r}" for key in changed)
                raise UsageError(f"{self.search_dir} holds another search ({shown[:300]}); give a new folder, or "
                                 "the same config, space and options to continue it")
        elif self.search_dir.is_dir() and any(p.name != LOCK_FILE for p in self.search_dir.iterdir()):
            raise UsageError(f"{self.search_dir} already holds files but no {RECORD}; give a new or empty folder")

    def open_study(self, create=True):
        """Open (or create) the study in the storage; one line if the storage cannot be opened, or if its study
        of this name belongs to another search folder."""
        import optuna

        url = self.url
        try:
            self.storage = open_storage(url)
            if create:
                direction = "maximize" if maximized(self.record["metric"]) else "minimize"
                self.study = optuna.create_study(storage=self.storage, study_name=self.record["study"],
                                                 direction=direction, load_if_exists=True)
            else:
                self.study = optuna.load_study(storage=self.storage, study_name=self.record["study"])
        except Exception as e:  # noqa: BLE001 (a driver missing, a file that cannot be made, a server down...)
            raise UsageError(f"cannot open the storage {url} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else 'no reason given'})") from None
        if not create or not self.record["storage"]:
            return
        owner, here = self.study.user_attrs.get("search_dir"), str(self.search_dir.resolve())
        if owner is None:  # a storage elsewhere may hold many studies: each belongs to one search folder
            self.study.set_user_attr("search_dir", here)
        elif owner != here:
            raise UsageError(f"the study '{self.record['study']}' in {url} belongs to the search in {owner}; "
                             "give another --study name")

    def save_record(self):
        write_json(self.search_dir / RECORD, self.record)

    def link(self, number):
        r = self.record
        return TrialLink(self.url, r["study"], number, r["metric"], r["pruner"], r["min_epochs"], self.n_epochs)

    def trials(self):
        return self.study.get_trials(deepcopy=False)

    def prepare(self, number=None):
        """A new trial (or, with `number`, one asked before a kill that did not start): its point drawn, checked
        and stored -> (number, [--key=value, ...]), or None when the point is invalid (the trial fails)."""
        import optuna

        if number is None:
            self.study.sampler = make_sampler(self.record["sampler"], self.record["seed"], len(self.trials()))
            trial = self.study.ask()
        else:
            self.study.sampler = make_sampler(self.record["sampler"], self.record["seed"], number)
            trial = optuna.trial.Trial(self.study, self.trial_id(number))
        point = {d.key: d.suggest(trial, self.base) for d in self.dimensions}
        config = {**self.base, **self.fixed, **point}
        problems = self.family.problems(config)
        if problems:
            reason = f"its point is invalid: {'; '.join(problems)}"
            trial.set_user_attr("error", reason)
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            self.say(f"trial {trial.number} failed before it started: {reason}")
            return None
        return trial.number, self.arguments(point)

    def arguments(self, point):
        fixed = [f"--{key}={_text(value)}" for key, value in self.fixed.items()]
        return fixed + [f"--{key}={_text(value)}" for key, value in point.items()]

    def point_of(self, trial):
        """The trial's drawn values {key: value}, typed as the root types them; None while some key is not drawn
        yet (a kill between the ask and the draw)."""
        if set(trial.params) != {d.key for d in self.dimensions}:
            return None
        return {d.key: d.suggest(_Stored(trial.params), self.base) for d in self.dimensions}

    def config_of(self, trial):
        """The resolved config of a trial whose point is drawn."""
        return {**self.base, **self.fixed, **self.point_of(trial)}

    def run_finished(self, trial):
        """Whether the trial's run folder says finished, with the trial's own config."""
        return self.point_of(trial) is not None and is_finished(trial_folder(self.search_dir, trial.number),
                                                                self.config_of(trial))

    def unsettled(self):
        """The trials the study still has running, after a kill or a stop: those whose run finished are told so;
        -> the numbers of the others, to resume in their folders (or, not started yet, to prepare)."""
        import optuna

        waiting = []
        for trial in self.trials():
            if trial.state != optuna.trial.TrialState.RUNNING:
                continue
            if not self.settle(trial.number, None):
                waiting.append(trial.number)
        return waiting

    def finished_or_pruned(self, number):
        import optuna

        trial = self.storage.get_trial(self.trial_id(number))
        return trial.state == optuna.trial.TrialState.PRUNED or self.run_finished(trial)

    def trial_id(self, number):
        study_id = self.storage.get_study_id_from_name(self.record["study"])
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def settle(self, number, error):
        """After trial `number`'s run ended (`error`: None, or why it did not finish): a finished run completes the
        trial with its last epoch's metric; a pruned one is already told; a run that failed by itself fails the
        trial; one stopped or killed stays running, to resume. -> whether the trial is settled."""
        import optuna

        from src.sweep.jobs import resumable

        trial = self.storage.get_trial(self.trial_id(number))
        if trial.state != optuna.trial.TrialState.RUNNING:
            return True
        if self.run_finished(trial):
            self.study.tell(number, self.final_value(trial_folder(self.search_dir, number)))
            return True
        if error is None or resumable(error):
            return False
        self.storage.set_trial_user_attr(trial._trial_id, "error", error)
        self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        return True

    def final_value(self, folder):
        log = read_log(folder)
        value = log[self.record["metric"]].iloc[-1] if self.record["metric"] in log else None
        if value is None or not math.isfinite(value):
            raise RunError(f"{folder}/{LOG} has no {self.record['metric']} at its last epoch")
        return float(value)

    def say(self, line):
        print(line, flush=True)


class _Stored:
    """A trial's stored params read back through Dimension.suggest."""

    def __init__(self, params):
        self.params = params

    def suggest_categorical(self, key, choices):
        return self.params[key]

    def suggest_int(self, key, low, high, log=False):
        return self.params[key]

    def suggest_float(self, key, low, high, log=False):
        return self.params[key]

