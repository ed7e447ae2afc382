"""Named configs for `src/scripts/train_preact_resnet.py`: the pre-activation ResNet-18 of He et al. 2016
("Identity Mappings") with the CIFAR stem (src/resnets.py), on a common modern recipe."""
from pathlib import Path

from configs.training import TRAINING_ROOT, model_problems, n_outputs, size_problems, training_problems
from src.config import ConfigRegistry, register_family
from src.resnets import preact_resnet18_parameters

RUNNER = Path(__file__).resolve().parents[1] / "src" / "scripts" / "train_preact_resnet.py"
# SGD 0.1 with momentum 0.9, weight decay 5e-4, batch 128, cosine to 0 over 200 epochs, crops and flips:
# the recipe of kuangliu/pytorch-cifar, which made these CIFAR variants common (shared with configs/vgg.py).
COSINE_RECIPE = dict(dataset="cifar10", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
                     lr_schedule="cosine", n_epochs=200, augment=True)


def validate(config):
    """The shared keys' problems, then this family's; a list of lines."""
    problems = training_problems(config) + model_problems(config, "preact_resnet")
    if config["width"] < 1:
        problems.append(f"--width must be at least 1, not {config['width']}")
    elif n_outputs(config):
        problems += size_problems(config, preact_resnet18_parameters(n_outputs(config), config["width"]), ["width"])
    return problems


preact_resnet_configs = register_family(ConfigRegistry("preact_resnet", validate, RUNNER))
preact_resnet_configs.set_root(
    {
        "model": "preact_resnet",  # the family (src.models.MODELS); fixed for this runner
        "width": 64,  # channels of the first stage, doubled by each of the next three (64: ResNet-18's)
        **TRAINING_ROOT,
    }
)
preact_resnet_configs.derive("preact_resnet18", **COSINE_RECIPE)
