"""Named configs for `src/scripts/train_simple_CNN.py`. Add an experiment with `configs.derive(...)`."""
from src.config import ConfigRegistry

# Allowed values of the keys that take one of a few words; checked by `validate`.
CHOICES = {
    "dataset": ("cifar10", "cifar100"),
    "label_mode": ("fine", "coarse"),
    "lr_schedule": ("constant", "cosine", "linear"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16"),
}

simple_cnn_configs = ConfigRegistry()
simple_cnn_configs.set_root(
    {
        "dataset": "cifar10",  # cifar10 | cifar100
        "label_mode": "fine",  # CIFAR-100 only: fine (100 classes) | coarse (20)
        "n_layers": 3,  # conv blocks; channels double per block
        "n_filters": 32,  # channels of the first block
        "dim_dense": 256,  # units of the dense layer before the classifier
        "batch_norm": True,
        "dropout": 0.25,  # before the dense layer; 0 turns it off
        "batch_size": 128,
        "n_epochs": 30,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "lr_schedule": "cosine",  # constant | cosine | linear (to 0 at the last iteration)
        "augment": True,  # random crop (padding 4) and horizontal flip
        "valid_size": 5000,  # held out of the 50,000 training images
        "n_examples": -1,  # how many of the rest to train on; -1 = all
        "seed": 1,
        "device": "auto",  # auto (cuda if available) | cpu | cuda
        "precision": "auto",  # auto (bf16 where the hardware has it) | fp32 | bf16
        "num_threads": 0,  # CPU threads; 0 = PyTorch's choice ($OMP_NUM_THREADS, else one per core)
        "compile": False,  # torch.compile the training step (see README, Performance)
        "tensorboard": True,  # event files in SAVE_PATH/tensorboard (curves.png is always drawn)
        "checkpoint_every_n_batches": 0,  # counted from the start of training; 0 = off
        "checkpoint_every_seconds": 300.0,  # 0 = off
    }
)
simple_cnn_configs.derive("cifar10", dataset="cifar10")
simple_cnn_configs.derive("cifar100", dataset="cifar100")
simple_cnn_configs.derive("cifar100_coarse", dataset="cifar100", label_mode="coarse")


def validate(config):
    """Check the values that a type alone cannot; returns the problems as a list of lines."""
    problems = [
        f"--{key} must be one of {', '.join(allowed)}, not '{config[key]}'"
        for key, allowed in CHOICES.items()
        if config[key] not in allowed
    ]
    for key in ("n_layers", "n_filters", "dim_dense", "batch_size", "n_epochs"):
        if config[key] < 1:
            problems.append(f"--{key} must be at least 1, not {config[key]}")
    if not 0 <= config["dropout"] < 1:
        problems.append(f"--dropout must be in [0, 1), not {config['dropout']}")
    if not 0 <= config["valid_size"] < 50000:
        problems.append(f"--valid_size must be in [0, 50000), not {config['valid_size']}")
    if config["n_examples"] == 0 or config["n_examples"] < -1:
        problems.append(f"--n_examples must be -1 (all) or at least 1, not {config['n_examples']}")
    if config["n_layers"] > 5:
        problems.append(f"--n_layers must be at most 5 (each block halves the 32x32 image), not {config['n_layers']}")
    for key in ("lr", "momentum", "weight_decay", "checkpoint_every_seconds"):
        if not config[key] >= 0:  # also catches nan
            problems.append(f"--{key} must not be negative, not {config[key]}")
    if config["num_threads"] < 0:
        problems.append(f"--num_threads must be 0 (PyTorch's choice) or more, not {config['num_threads']}")
    if config["checkpoint_every_n_batches"] < 0:
        problems.append("--checkpoint_every_n_batches must not be negative")
    return problems
