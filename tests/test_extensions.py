"""src.extensions on a tiny ignite Engine: Checkpoint's triggers, resume and optional registered state;
StopOnSignal; the one rule for "finished"."""
import types

import torch
from ignite.engine import Engine, Events

from src.runs.checkpoints import checkpoint_iteration, list_checkpoints, load_tensors
from src.training.distributed import SingleProcess
from src.extensions import Checkpoint, StopOnSignal
from src.main_loop import Progress
from src.runs.folder import RunFolder, ends_run, is_finished

BATCHES = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))] * 4  # 4 batches per epoch


class Counter:
    """Some extra state an extension would register (an EMA, a scaler)."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": torch.tensor(self.count)}

    def load_state_dict(self, state):
        self.count = int(state["count"])


def tiny_loop(path, **config):
    """What Checkpoint needs of a main loop, around a real Engine and a one-layer model."""
    config = {"checkpoint_every_n_batches": 0, "checkpoint_every_seconds": 0, "n_epochs": 2, **config}
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    progress = Progress(torch.device("cpu"))

    def step(engine, batch):
        images, labels = batch
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.add(loss, model(images), labels, engine.state.iteration)

    trainer = Engine(step)
    folder = RunFolder(path)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.checkpoints.mkdir(exist_ok=True)
    loop = types.SimpleNamespace(config=config, folder=folder, model=model, optimizer=optimizer, trainer=trainer,
                                 progress=progress, ranks=SingleProcess(), said=[])
    loop.say = loop.said.append
    loop.status = lambda: {"epochs_done": len(progress.log), "iterations_done": trainer.state.iteration}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: progress.log.append({"epoch": engine.state.epoch}))
    return loop


def test_checkpoint_triggers_every_n_batches_and_at_epoch_ends(tmp_path):
    loop = tiny_loop(tmp_path / "run", checkpoint_every_n_batches=3)
    checkpoint = Checkpoint(loop)
    checkpoint.attach(loop.trainer)
    saved = []
    loop.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: saved.append(
        checkpoint_iteration(list_checkpoints(loop.folder.checkpoints)[0]) if list_checkpoints(
            loop.folder.checkpoints) else None))
    loop.trainer.run(BATCHES, max_epochs=2)
    # every 3 batches (3, 6) and each epoch end (4, 8); an epoch's last batch waits for its log row
    assert saved == [None, None, 3, 3, 4, 6, 6, 6]
    assert [checkpoint_iteration(p) for p in list_checkpoints(loop.folder.checkpoints)] == [8, 6]
    contents = load_tensors(list_checkpoints(loop.folder.checkpoints)[0])
    assert len(contents["progress"]["log"]) == 2


def test_registered_state_is_saved_and_optional_on_load(tmp_path):
    old = tiny_loop(tmp_path / "run")
    Checkpoint(old).attach(old.trainer)
    old.trainer.run(BATCHES, max_epochs=1)  # a checkpoint written before the extension existed

    counter = Counter()
    loop = tiny_loop(tmp_path / "run")
    checkpoint = Checkpoint(loop)
    checkpoint.register("counter", counter)
    checkpoint.attach(loop.trainer)
    assert checkpoint.resume(len(BATCHES))  # no 'counter' entry: not corrupt, the counter keeps its start
    assert counter.count == 0 and loop.trainer.state.iteration == 4
    counter.count = 7
    loop.trainer.run(BATCHES, max_epochs=2)
    assert int(load_tensors(list_checkpoints(loop.folder.checkpoints)[0])["counter"]["count"]) == 7

    again, fresh = tiny_loop(tmp_path / "run"), Counter()
    resumed = Checkpoint(again)
    resumed.register("counter", fresh)
    resumed.attach(again.trainer)
    assert resumed.resume(len(BATCHES)) and fresh.count == 7 and again.trainer.state.iteration == 8


def test_stop_on_signal_saves_and_stops_after_the_step(tmp_path):
    loop = tiny_loop(tmp_path / "run")
    checkpoint = Checkpoint(loop)
    checkpoint.attach(loop.trainer)
    stops = types.SimpleNamespace(requested=False)  # as if a signal arrived during step 2
    loop.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(stops, "requested",
                                                                            e.state.iteration == 2))
    StopOnSignal(stops, checkpoint, loop.ranks).attach(loop.trainer)
    loop.trainer.run(BATCHES, max_epochs=2)
    assert loop.trainer.state.iteration == 2
    assert [checkpoint_iteration(p) for p in list_checkpoints(loop.folder.checkpoints)] == [2]


def test_one_rule_for_finished():
    done = {"finished": True, "epochs_done": 3}
    assert is_finished(done, 3) and is_finished({**done, "epochs_done": 4}, 3)
    assert not is_finished(done, 5)  # n_epochs raised: unfinished again
    assert is_finished({"finished": True, "epochs_done": 1, "finished_early": True}, 5)  # an early stop is final
    assert is_finished({"finished": True}, 3)  # no count to go by: the flag says it
    for unfinished in (None, [], {"epochs_done": 3}, {"finished": False, "epochs_done": 3}, {"finished": "yes"}):
        assert not is_finished(unfinished, 3)
    assert ends_run(3, False, 3) and ends_run(1, True, 3) and not ends_run(2, False, 3)
