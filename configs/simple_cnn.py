"""Named configs for `src/scripts/train_simple_CNN.py`. Add an experiment with `configs.derive(...)`."""
from configs.training import (  # noqa: F401  (MAX_PARAMETERS, TRAINING_ROOT, training_problems: public here too)
    MAX_PARAMETERS, TRAINING_ROOT, choices, family_registry, n_outputs, size_problems, training_problems,
)
from src.data import DATASETS

# Allowed values of the keys that take one of a few words (the registries' names; see configs/training.py).
CHOICES = choices()
# The label sets of the built-in datasets and their classes, as their entries in src.data.DATASETS say.
CLASSES = {(name, mode): n for name, entry in DATASETS.items() for mode, n in entry.n_classes.items()}


def family_problems(config):
    """Check the values that a type alone cannot; returns the problems as a list of lines.

    Sizes are checked against what the hardware could ever hold, computed from the config alone,
    so an absurd value is refused before anything is built or written.
    """
    problems = []
    for key in ("n_layers", "n_filters", "dim_dense"):
        if config[key] < 1:
            problems.append(f"--{key} must be at least 1, not {config[key]}")
    if not 0 <= config["dropout"] < 1:
        problems.append(f"--dropout must be in [0, 1), not {config['dropout']}")
    if config["n_layers"] > 5:
        problems.append(f"--n_layers must be at most 5 (each block halves the 32x32 image), not {config['n_layers']}")
    sizes_sane = 1 <= config["n_layers"] <= 5 and config["n_filters"] >= 1 and config["dim_dense"] >= 1
    if sizes_sane and n_outputs(config) is not None:  # what the count needs
        problems += size_problems(config, simple_cnn_parameters(config), ("n_layers", "n_filters", "dim_dense"))
    return problems


simple_cnn_configs = family_registry("simple_cnn", family_problems, {
    "n_layers": 3,  # conv blocks; channels double per block
    "n_filters": 32,  # channels of the first block
    "dim_dense": 256,  # units of the dense layer before the classifier
    "batch_norm": True,
    "dropout": 0.25,  # before the dense layer; 0 turns it off
}, runner="train_simple_CNN.py")
simple_cnn_configs.derive("cifar10", dataset="cifar10")
simple_cnn_configs.derive("cifar100", dataset="cifar100")
simple_cnn_configs.derive("cifar100_coarse", dataset="cifar100", label_mode="coarse")


def simple_cnn_parameters(config):
    """How many parameters `src.models.build_simple_cnn(config)` has, without building it."""
    count, channels = 0, 3
    for i in range(config["n_layers"]):
        out = config["n_filters"] * 2**i
        count += channels * out * 9 + (2 * out if config["batch_norm"] else out)  # conv (+ bias or batch norm)
        channels = out
    side = 32 // 2 ** config["n_layers"]
    return count + (channels * side * side + 1) * config["dim_dense"] + (config["dim_dense"] + 1) * n_outputs(config)


validate = simple_cnn_configs.problems  # the whole check (the shared keys', then the family's), by its old name
