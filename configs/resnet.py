"""Named configs for `src/scripts/train_resnet.py`: He et al. 2016's CIFAR ResNets (src/networks/resnet.py) and
their recipe."""
from configs.training import family_registry, n_outputs, size_problems
from src.networks.resnet import resnet_parameters

SHORTCUTS = ("A", "B")


def family_problems(config):
    """This family's problems (configs.training adds the shared keys'); a list of lines."""
    problems = []
    depth = config["depth"]
    if depth < 8 or (depth - 2) % 6:
        problems.append(f"--depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), not {depth}")
    elif config["shortcut"] in SHORTCUTS and n_outputs(config):
        problems += size_problems(config, resnet_parameters(depth, n_outputs(config), config["shortcut"]), ["depth"])
    if config["shortcut"] not in SHORTCUTS:
        problems.append(f"--shortcut must be A (zero-padding identity, the paper's CIFAR choice) or B "
                        f"(projections), not '{config['shortcut']}'")
    return problems


resnet_configs = family_registry("resnet", family_problems, {
    "depth": 20,  # 6n + 2: n basic blocks in each of the three stages (16, 32, 64 channels)
    "shortcut": "A",  # where the shape changes: A, subsample + zero channels (no parameters) | B, 1x1 projection
})

# He et al. 2016, Sec. 4.2: SGD, momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k
# and 48k iterations, stopped at 64k, on a 45k/5k train/validation split with 4-pixel-padded crops and flips.
# An epoch of 45,000 images is 351 batches of 128 (the partial one dropped), so 182 epochs are 63,882
# iterations: the paper's 64k, to within the last 118.
HE_RECIPE = dict(dataset="cifar10", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128,
                 lr_schedule="multistep", schedule_unit="iterations", lr_milestones=[32000, 48000], lr_decay=0.1,
                 n_epochs=182, valid_size=5000, augment=True)
for _depth in (20, 32, 44, 56):
    resnet_configs.derive(f"resnet{_depth}", depth=_depth, **HE_RECIPE)
# ResNet-110: "0.1 is slightly too large to start converging", so 0.01 until the training error is below
# 80% ("about 400 iterations"), then back to 0.1.
resnet_configs.derive("resnet110", depth=110, **HE_RECIPE, warmup=400, warmup_shape="constant", warmup_lr=0.01)
