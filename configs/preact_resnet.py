"""Named configs for `src/scripts/train_preact_resnet.py`: the pre-activation ResNet-18 of He et al. 2016
("Identity Mappings") with the CIFAR stem (src/networks/preact_resnet.py), on a common modern recipe."""
from configs.training import COSINE_RECIPE, family_registry, n_outputs, size_problems
from src.networks.preact_resnet import preact_resnet18_parameters


def family_problems(config):
    """This family's problems (configs.training adds the shared keys'); a list of lines."""
    problems = []
    if config["width"] < 1:
        problems.append(f"--width must be at least 1, not {config['width']}")
    elif n_outputs(config):
        problems += size_problems(config, preact_resnet18_parameters(n_outputs(config), config["width"]), ["width"])
    return problems


preact_resnet_configs = family_registry("preact_resnet", family_problems, {
    "width": 64,  # channels of the first stage, doubled by each of the next three (64: ResNet-18's)
})
preact_resnet_configs.derive("preact_resnet18", **COSINE_RECIPE)
