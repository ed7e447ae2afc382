"""Named configs for `src/scripts/train_vgg.py`: VGG with batch norm, CIFAR variant (src/vgg.py)."""
from pathlib import Path

from configs.preact_resnet import COSINE_RECIPE
from configs.training import (
    TRAINING_ROOT, dropout_problems, model_problems, n_outputs, size_problems, training_problems,
)
from src.config import ConfigRegistry, register_family
from src.vgg import LAYERS, vgg_parameters

RUNNER = Path(__file__).resolve().parents[1] / "src" / "scripts" / "train_vgg.py"


def validate(config):
    """The shared keys' problems, then this family's; a list of lines."""
    problems = training_problems(config) + model_problems(config, "vgg") + dropout_problems(config)
    if config["depth"] not in LAYERS:
        problems.append(f"--depth must be one of {', '.join(map(str, LAYERS))} (the paper's columns A, B, D, E), "
                        f"not {config['depth']}")
    if config["width"] < 1:
        problems.append(f"--width must be at least 1, not {config['width']}")
    if config["depth"] in LAYERS and config["width"] >= 1 and n_outputs(config):
        problems += size_problems(config, vgg_parameters(config["depth"], n_outputs(config), config["width"]),
                                  ["depth", "width"])
    return problems


vgg_configs = register_family(ConfigRegistry("vgg", validate, RUNNER))
vgg_configs.set_root(
    {
        "model": "vgg",  # the family (src.models.MODELS); fixed for this runner
        "depth": 16,  # weight layers: 11 | 13 | 16 | 19
        "width": 64,  # channels of the first convolutions; the later ones scale with it (64: the paper's)
        "dropout": 0.0,  # before the dense layer; 0 turns it off
        **TRAINING_ROOT,
    }
)
vgg_configs.derive("vgg11_bn", depth=11, **COSINE_RECIPE)
vgg_configs.derive("vgg16_bn", depth=16, **COSINE_RECIPE)
