"""EMA: an exponential moving average of the weights, updated after every step, kept in the checkpoint."""
import copy

import torch
from ignite.engine import Events


class EMA:
    """An exponential moving average of the weights (`ema` = its decay), updated after every optimizer step:
    W_ema <- decay * W_ema + (1 - decay) * W, starting from the weights after the first step.

    Batch-norm statistics are averaged like the weights (as `AveragedModel(use_buffers=True)` does), so the
    average is a model that runs as it is, without a pass over the data to recompute them. The main loop
    validates it each epoch (`ema_valid_loss`, `ema_valid_acc`) and, while it is on, chooses and saves
    `best_model.pt` from it. Its state goes into the checkpoint as "ema": {"model": a state dict the
    model's own `load_state_dict` takes, "n_averaged": the number of updates}.
    """

    def __init__(self, model, decay, checkpoint=None):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.source, self.checkpoint = model, checkpoint
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.average = get_ema_multi_avg_fn(decay)  # torch's own arithmetic (a foreach lerp)
        self.n_averaged = 0

    def attach(self, engine):
        """Attach before Checkpoint: every checkpoint then holds the average of the step it saves."""
        self.checkpoint.register("ema", self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    @torch.no_grad()
    def update(self, engine=None):
        """What `AveragedModel.update_parameters` does, with the count kept on the host: its count is a tensor,
        and reading it (or copying it to the GPU) would make every step wait for the device."""
        pairs = zip([*self.model.parameters(), *self.model.buffers()],
                    [*self.source.parameters(), *self.source.buffers()], strict=True)
        if self.n_averaged == 0:
            for averaged, current in pairs:
                averaged.copy_(current)
        else:
            by_dtype = {}  # the average takes tensors of one dtype at a time (batch norm counts are int64)
            for averaged, current in pairs:
                lists = by_dtype.setdefault(averaged.dtype, ([], []))
                lists[0].append(averaged)
                lists[1].append(current)
            for averaged, current in by_dtype.values():
                self.average(averaged, current, None)
        self.n_averaged += 1

    def state_dict(self):
        return {"model": self.model.state_dict(), "n_averaged": torch.tensor(self.n_averaged)}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.n_averaged = int(state["n_averaged"])
