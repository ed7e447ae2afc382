"""A whole run of the main loop under torchrun; then each rank writes to argv[2].<rank> how many DDP wrappers are
still alive (without collecting them): one alive past the group's teardown is freed at interpreter exit, where
gloo aborts the process. Used by tests/test_distributed.py."""
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from configs.simple_cnn import simple_cnn_configs  # noqa: E402
from src.main_loop import run_main_loop  # noqa: E402

config = {**simple_cnn_configs.get("cifar10"), "n_layers": 2, "n_filters": 4, "dim_dense": 16, "batch_size": 32,
          "valid_size": 100, "n_epochs": 1, "checkpoint_every_seconds": 0}
gc.disable()  # only what the code frees itself counts, not what a collection happens to find meanwhile
code = run_main_loop(config, sys.argv[1])
alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
Path(f"{sys.argv[2]}.{__import__('os').environ['RANK']}").write_text(f"{code} {alive}")
