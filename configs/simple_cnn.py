"""Named configs for `src/scripts/train_simple_CNN.py`. Add an experiment with `configs.derive(...)`."""
from src.config import ConfigRegistry

# Allowed values of the keys that take one of a few words; checked by `validate`.
CHOICES = {
    "dataset": ("cifar10", "cifar100"),
    "label_mode": ("fine", "coarse"),
    "lr_schedule": ("constant", "cosine", "linear"),
    "optimizer": ("sgd", "nesterov", "adamw"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16"),
}
# The label sets each dataset has, and their classes (as src.data.DATASETS says; a test keeps them equal).
CLASSES = {("cifar10", "fine"): 10, ("cifar100", "fine"): 100, ("cifar100", "coarse"): 20}
TRAIN_IMAGES = 50000  # in CIFAR-10 and CIFAR-100 alike
# Far above any model this family is meant for (n_filters=512, n_layers=5 has 0.4e9; WRN-28-10 has
# 0.04e9), yet training one this size takes 24 GB (weights, gradients, momentum): a larger count is a typo.
MAX_PARAMETERS = 2 * 10**9

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
        "optimizer": "sgd",  # sgd | nesterov | adamw (beta1 = momentum)
        "adam_beta2": 0.999,  # adamw only
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
    """Check the values that a type alone cannot; returns the problems as a list of lines.

    Sizes are checked against what the hardware could ever hold, computed from the config alone,
    so an absurd value is refused before anything is built or written.
    """
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
    if config["batch_size"] > TRAIN_IMAGES:
        problems.append(f"--batch_size must be at most {TRAIN_IMAGES} (the training images CIFAR has), "
                        f"not {config['batch_size']}")
    known = config["dataset"] in CHOICES["dataset"] and config["label_mode"] in CHOICES["label_mode"]
    if known and (config["dataset"], config["label_mode"]) not in CLASSES:
        problems.append(f"--label_mode={config['label_mode']} needs --dataset=cifar100 "
                        f"({config['dataset']} has fine labels only)")
    sizes_sane = 1 <= config["n_layers"] <= 5 and config["n_filters"] >= 1 and config["dim_dense"] >= 1
    if sizes_sane and (config["dataset"], config["label_mode"]) in CLASSES:  # what the count needs
        problems += _size_problems(config)
    return problems


def simple_cnn_parameters(config):
    """How many parameters `src.models.build_simple_cnn(config)` has, without building it."""
    count, channels = 0, 3
    for i in range(config["n_layers"]):
        out = config["n_filters"] * 2**i
        count += channels * out * 9 + (2 * out if config["batch_norm"] else out)  # conv (+ bias or batch norm)
        channels = out
    side = 32 // 2 ** config["n_layers"]
    n_outputs = CLASSES[config["dataset"], config["label_mode"]]
    return count + (channels * side * side + 1) * config["dim_dense"] + (config["dim_dense"] + 1) * n_outputs


def _size_problems(config):
    count = simple_cnn_parameters(config)
    if count <= MAX_PARAMETERS:
        return []
    sizes = ", ".join(f"--{key}={config[key]}" for key in ("n_layers", "n_filters", "dim_dense"))
    return [f"{sizes} give a model of {count:.3g} parameters; at most {MAX_PARAMETERS:,} can be trained "
            "(4 bytes for each weight, its gradient and the optimizer's state of it)"]
