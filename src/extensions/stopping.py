"""StopOnSignal: SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 (src.signals.StopRequests) end the run after the step
in flight, with a checkpoint; under torchrun every rank stops at the same step (`agreed`)."""
from ignite.engine import Events

from src.extensions.saveload import agreed, at_epoch_end


class StopOnSignal:
    """A stop signal (src.signals.StopRequests) ends the run after the step in flight, with a checkpoint.

    Attach after Checkpoint and after the epoch's log row: at an epoch's last step the stop waits for
    EPOCH_COMPLETED, so the checkpoint it writes holds that epoch's row.
    """

    def __init__(self, stops, checkpoint, ranks):
        self.stops, self.checkpoint, self.ranks = stops, checkpoint, ranks

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.stop_if_asked, mid_epoch=True)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.stop_if_asked, mid_epoch=False)

    def stop_if_asked(self, engine, mid_epoch):
        if mid_epoch and at_epoch_end(engine):
            return  # the epoch's end comes first, then this is asked again
        if agreed(self.ranks, engine, self.stops.requested, mid_epoch):
            self.checkpoint.save(engine)
            engine.terminate(skip_completed=True)
