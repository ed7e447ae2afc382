"""One training step of the main loop's model on the first global batch, alone or under torchrun;
rank 0 saves the parameters' gradients to the file named by argv[1]. Used by tests/test_distributed.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs.simple_cnn import simple_cnn_configs  # noqa: E402
from src.training import distributed  # noqa: E402
from src.data import get_cifar  # noqa: E402
from src.main_loop import data_parallel, training_model  # noqa: E402
from src.models import build_simple_cnn  # noqa: E402

ranks = distributed.from_environment()
# No batch norm: on CPUs each rank normalises its own slice (SyncBatchNorm needs GPUs); no dropout.
config = {**simple_cnn_configs.get("cifar10"), "n_layers": 2, "n_filters": 4, "dim_dense": 16, "batch_size": 32,
          "valid_size": 100, "batch_norm": False, "dropout": 0.0}
device = torch.device("cpu")
stream, _ = get_cifar("cifar10", True, config["batch_size"], config["seed"], device, config["valid_size"],
                      shard=(ranks.rank, ranks.world_size))
model, _ = training_model(config, build_simple_cnn, stream, device, "contiguous")
images, labels = next(stream.epoch(1))
forward = data_parallel(model, device, ranks)  # kept alive: its hooks average the gradients in backward()
F.cross_entropy(forward(images).float(), labels).backward()
if ranks.is_main:
    torch.save({name: p.grad for name, p in model.named_parameters()}, sys.argv[1])
del forward  # the wrapper holds the process group: freed after close(), at interpreter exit, gloo would abort
ranks.close()
