"""Named configs for `src/scripts/train_wrn.py`: Zagoruyko & Komodakis 2016's Wide ResNets (src/networks/wrn.py)
and their CIFAR recipe."""
from configs.training import dropout_problems, family_registry, n_outputs, size_problems
from src.networks.wrn import wrn_parameters



def family_problems(config):
    """This family's problems (configs.training adds the shared keys'); a list of lines."""
    problems = dropout_problems(config)
    depth, widen_factor = config["depth"], config["widen_factor"]
    if depth < 10 or (depth - 4) % 6:
        problems.append(f"--depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), not {depth}")
    if widen_factor < 1:
        problems.append(f"--widen_factor must be at least 1, not {widen_factor}")
    if not problems and n_outputs(config):
        problems += size_problems(config, wrn_parameters(depth, widen_factor, n_outputs(config)),
                                  ["depth", "widen_factor"])
    return problems


wrn_configs = family_registry("wrn", family_problems, {
    "depth": 28,  # 6n + 4: n pre-activation blocks in each of the three stages
    "widen_factor": 10,  # k: the stages have 16k, 32k, 64k channels
    "dropout": 0.0,  # between the two convolutions of each block; 0 turns it off
})

# Zagoruyko & Komodakis 2016, Sec. 3: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128,
# lr 0.1 multiplied by 0.2 at epochs 60, 120 and 160 of 200, crops and flips; dropout 0.3 (Sec. 4).
WRN_RECIPE = dict(optimizer="nesterov", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
                  lr_schedule="multistep", schedule_unit="epochs", lr_milestones=[60, 120, 160], lr_decay=0.2,
                  n_epochs=200, dropout=0.3, augment=True)
for _depth, _k in ((16, 4), (28, 10)):
    wrn_configs.derive(f"wrn_{_depth}_{_k}", depth=_depth, widen_factor=_k, dataset="cifar10", **WRN_RECIPE)
    wrn_configs.derive(f"wrn_{_depth}_{_k}_cifar100", depth=_depth, widen_factor=_k, dataset="cifar100", **WRN_RECIPE)
