"""Named configs for `src/scripts/train_vgg.py`: VGG with batch norm, CIFAR variant (src/networks/vgg.py)."""
from configs.training import COSINE_RECIPE, dropout_problems, family_registry, n_outputs, size_problems
from src.networks.vgg import LAYERS, vgg_parameters



def family_problems(config):
    """This family's problems (configs.training adds the shared keys'); a list of lines."""
    problems = dropout_problems(config)
    if config["depth"] not in LAYERS:
        problems.append(f"--depth must be one of {', '.join(map(str, LAYERS))} (the paper's columns A, B, D, E), "
                        f"not {config['depth']}")
    if config["width"] < 1:
        problems.append(f"--width must be at least 1, not {config['width']}")
    if config["depth"] in LAYERS and config["width"] >= 1 and n_outputs(config):
        problems += size_problems(config, vgg_parameters(config["depth"], n_outputs(config), config["width"]),
                                  ["depth", "width"])
    return problems


vgg_configs = family_registry("vgg", family_problems, {
    "depth": 16,  # weight layers: 11 | 13 | 16 | 19
    "width": 64,  # channels of the first convolutions; the later ones scale with it (64: the paper's)
    "dropout": 0.0,  # before the dense layer; 0 turns it off
})
vgg_configs.derive("vgg11_bn", depth=11, **COSINE_RECIPE)
vgg_configs.derive("vgg16_bn", depth=16, **COSINE_RECIPE)
