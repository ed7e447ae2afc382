"""The training keys every model family shares, their checks, and the skeleton of a family's registry
(`family_registry`): a family module (configs/<family>.py) gives only its own keys, checks and named configs.

New keys default to what the code did before they existed ("off"), so that a run folder saved
before a key was added resumes with the same behaviour (see src.config.ConfigRegistry.complete).
"""
from pathlib import Path

from src.config import ConfigRegistry, register_family
from src.data import dataset_entry, dataset_names, training_set_size
from src.datasets import stream
from src.training import kernels, muon, optim

RUNNERS = Path(__file__).resolve().parents[1] / "src" / "scripts"  # a family's runner: train_<family>.py here

TRAINING_ROOT = {
    "dataset": "cifar10",  # a name in src.data.DATASETS: cifar10 | cifar100
    "label_mode": "fine",  # CIFAR-100 only: fine (100 classes) | coarse (20)
    "batch_size": 128,
    "n_epochs": 30,
    "n_iterations": 0,  # > 0: the run's steps, ending mid-way through its last epoch (hiverge's 243); 0 = n_epochs
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",  # src.training.optim.SCHEDULES: constant | cosine | linear (to 0 at the end) | multistep
    "lr_milestones": [],  # multistep: where the lr is multiplied by lr_decay, in schedule_unit
    "lr_decay": 0.1,  # multistep: the factor at each milestone
    "warmup": 0,  # warmup length in schedule_unit before the schedule; 0 = off
    "warmup_shape": "linear",  # linear (from warmup_lr up to the schedule's lr) | constant (warmup_lr throughout)
    "warmup_lr": 0.0,  # the learning rate the warmup starts from (linear) or holds (constant)
    "schedule_unit": "epochs",  # epochs | iterations: the unit of lr_milestones and warmup
    "optimizer": "sgd",  # a name in src.training.optim.OPTIMIZERS: sgd | nesterov | adamw (beta1 = momentum)
    "adam_beta2": 0.999,  # adamw only
    # optimizer=muon (src/training/muon.py): filter banks and dense weights take Muon at muon_lr, the rest SGD with
    # Nesterov momentum at lr, momentum and weight_decay (a model may choose its own split, as the fast family does)
    "muon_lr": 0.24,  # airbench94_muon's; follows the schedule as lr does
    "muon_momentum": 0.6,  # Muon's Nesterov momentum (the sum form buf = m buf + g)
    "muon_weight_decay": 0.0,  # decoupled, applied after the update
    "muon_ns_steps": 3,  # Newton-Schulz steps
    "muon_coefficients": "airbench",  # the iteration's (a, b, c): airbench (3.4445, -4.7750, 2.0315) | hiverge
    "muon_ns_dtype": "bfloat16",  # the iteration's arithmetic: bfloat16 (airbench's) | float16 (hiverge's) | float32
    "muon_norm_every": 0,  # project each bank to norm sqrt(out channels) every this many steps; 0 = off
    "muon_norm_schedule": "fixed",  # fixed (every muon_norm_every) | hiverge (after 2 + int(15 t / T) steps)
    "augment": True,  # random crop and horizontal flip, as the next three keys say; false = neither
    "crop_padding": 4,  # the crop's padding: a random translation by up to this many pixels each way; 0 = none
    "crop_padding_mode": "zeros",  # zeros | reflect (the image mirrored at its border, as airbench94 pads)
    "flip": "random",  # random (per image and batch) | alternate (per image every other epoch, airbench94's) | none
    "cutout": 0,  # side of the square cut out of each training image (DeVries & Taylor 2017); 0 = off
    "mixup": 0.0,  # mixup's alpha (Zhang et al. 2018); 0 = off
    "brightness": 0.0,  # per image, b ~ U(-this, this) added to the standardised image (hiverge's 0.1399); 0 = off
    "contrast": 0.0,  # per image, then times c ~ U(1 - this, 1 + this) (hiverge's 0.1308); 0 = off
    "label_smoothing": 0.0,  # of the training loss; 0 = off
    "ema": 0.0,  # decay of an exponential moving average of the weights, evaluated each epoch; 0 = off
    "grad_clip": 0.0,  # clip the gradients' global norm to this; 0 = off
    "valid_size": 5000,  # held out of the training images
    "n_examples": -1,  # how many of the rest to train on; -1 = all
    "seed": 1,
    "device": "auto",  # auto (cuda if available) | cpu | cuda
    # auto = the fastest measured here (src.training.kernels; a resumed run keeps its own) | fp32 | bf16 | fp16
    "precision": "auto",
    "memory_format": "auto",  # auto (as precision) | channels_last | contiguous (NCHW)
    "num_threads": 0,  # CPU threads; 0 = PyTorch's choice ($OMP_NUM_THREADS, else one per core)
    "compile": False,  # torch.compile the training step (see docs/performance.md)
    "compile_mode": "default",  # torch.compile's mode when compile is on
    # CUDA only: true = deterministic kernels (bit-exact resume), false = cuDNN autotuning (faster); no effect
    # on a CPU, whose runs are bit-exact either way, so false keeps every CPU run (and old folder) as it was.
    "deterministic": False,
    "valid_every": 1,  # validate every this many epochs, and always the last one
    # curves.png at most this often, and at the end: a drawing takes 0.3 s on this project's CPU, so at most
    # 0.5% of the time at 60 s (2% when drawn after every 15 s default epoch, as before the key existed).
    "plot_every_seconds": 60.0,
    "tensorboard": True,  # event files in SAVE_PATH/tensorboard (curves.png is always drawn)
    "checkpoint_every_n_batches": 0,  # counted from the start of training; 0 = off
    "checkpoint_every_seconds": 300.0,  # 0 = off
}
# Far above any model these families are meant for (the simple CNN at n_filters=512, n_layers=5 has 0.4e9;
# WRN-28-10 has 0.04e9), yet training one this size takes 24 GB (weights, gradients, momentum): a typo.
MAX_PARAMETERS = 2 * 10**9
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
FIXED_CHOICES = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16", "fp16"),
                 "memory_format": kernels.MEMORY_FORMATS,
                 "compile_mode": COMPILE_MODES,
                 "warmup_shape": ("linear", "constant"), "schedule_unit": ("epochs", "iterations"),
                 "muon_coefficients": tuple(muon.COEFFICIENTS), "muon_ns_dtype": tuple(muon.DTYPES),
                 "muon_norm_schedule": muon.NORM_SCHEDULES}
AUGMENT_CHOICES = {"crop_padding_mode": stream.PADDING_MODES, "flip": stream.FLIPS}  # src.datasets.stream's words


def choices():
    """Allowed values of the keys that take one of a few words, read from the registries at call time (a
    dataset, optimizer or schedule registered by a researcher counts at once)."""
    return {"dataset": tuple(dataset_names()), "label_mode": label_modes(), "lr_schedule": tuple(optim.SCHEDULES),
            "optimizer": tuple(optim.OPTIMIZERS), **FIXED_CHOICES, **AUGMENT_CHOICES}


def label_modes():
    return tuple(dict.fromkeys(mode for name in dataset_names() for mode in dataset_entry(name).n_classes))


def training_problems(config):
    """The shared keys' problems that a type alone cannot catch, as lines."""
    problems = [f"--{key} must be one of {', '.join(allowed)}, not '{config[key]}'"
                for key, allowed in choices().items() if config[key] not in allowed]
    for key in ("batch_size", "n_epochs"):
        if config[key] < 1:
            problems.append(f"--{key} must be at least 1, not {config[key]}")
    if config["n_iterations"] < 0:
        problems.append(f"--n_iterations must not be negative (0: n_epochs whole epochs), not {config['n_iterations']}")
    for key in ("lr", "momentum", "weight_decay", "checkpoint_every_seconds", "plot_every_seconds"):
        if not config[key] >= 0:  # also catches nan
            problems.append(f"--{key} must not be negative, not {config[key]}")
    if not 0 <= config["adam_beta2"] < 1:
        problems.append(f"--adam_beta2 must be in [0, 1), not {config['adam_beta2']}")
    problems += recipe_problems(config)
    problems += augment_problems(config)
    if config["n_examples"] == 0 or config["n_examples"] < -1:
        problems.append(f"--n_examples must be -1 (all) or at least 1, not {config['n_examples']}")
    if config["num_threads"] < 0:
        problems.append(f"--num_threads must be 0 (PyTorch's choice) or more, not {config['num_threads']}")
    if config["checkpoint_every_n_batches"] < 0:
        problems.append("--checkpoint_every_n_batches must not be negative")
    if config["valid_every"] < 1:
        problems.append(f"--valid_every must be at least 1 (epochs), not {config['valid_every']}")
    if config["dataset"] in dataset_names():
        problems += dataset_problems(config) or warmup_problems(config)
    return problems


def warmup_problems(config):
    """A linear warmup longer than the run: the learning rate would still be climbing from warmup_lr when the
    run ends (`--warmup=1000` in a 2-epoch run trained at about 4e-7). A constant one trains at warmup_lr."""
    warmup, unit = config["warmup"], config["schedule_unit"]
    if not warmup or config["warmup_shape"] != "linear" or unit not in ("epochs", "iterations"):
        return []
    images = training_set_size(config["dataset"]) - config["valid_size"]
    if config["n_examples"] > 0:
        images = min(images, config["n_examples"])
    length = config["n_epochs"] * (1 if unit == "epochs" else max(images // config["batch_size"], 1))
    if warmup <= length:
        return []
    return [f"--warmup={warmup} {unit} is longer than the whole run ({length} {unit}): a linear warmup would "
            "never reach --lr; shorten it or raise --n_epochs"]


def dataset_problems(config):
    """Sizes and label sets checked against the dataset's entry (the training-set size, its label modes)."""
    problems, n_train = [], training_set_size(config["dataset"])
    if not 0 <= config["valid_size"] < n_train:
        problems.append(f"--valid_size must be in [0, {n_train}), not {config['valid_size']}")
    if config["batch_size"] > n_train:
        problems.append(f"--batch_size must be at most {n_train} (the training images {config['dataset']} has), "
                        f"not {config['batch_size']}")
    modes = dataset_entry(config["dataset"]).n_classes
    if config["label_mode"] in label_modes() and config["label_mode"] not in modes:
        having = [name for name in dataset_names() if config["label_mode"] in dataset_entry(name).n_classes]
        problems.append(f"--label_mode={config['label_mode']} needs --dataset={' or '.join(having)} "
                        f"({config['dataset']} has: {', '.join(modes)})")
    return problems


def recipe_problems(config):
    """The schedule's and the regularisers' keys."""
    problems = []
    milestones = config["lr_milestones"]
    if not (all(type(m) is int and m > 0 for m in milestones) and milestones == sorted(set(milestones))):
        problems.append(f"--lr_milestones must be increasing positive integers (in {config['schedule_unit']}), "
                        f"not {milestones}")
    if (config["lr_schedule"] == "multistep") != bool(milestones):  # one without the other would be ignored
        problems.append("--lr_schedule=multistep needs --lr_milestones (e.g. [100,150])" if not milestones
                        else f"--lr_milestones={milestones} needs --lr_schedule=multistep")
    for key in ("lr_decay", "warmup_lr", "mixup", "grad_clip"):
        if not config[key] >= 0:  # also catches nan
            problems.append(f"--{key} must not be negative, not {config[key]}")
    for key in ("warmup", "cutout"):
        if config[key] < 0:
            problems.append(f"--{key} must not be negative, not {config[key]}")
    if config["cutout"] > 32:
        problems.append(f"--cutout must be at most 32 (the image's side), not {config['cutout']}")
    for key in ("label_smoothing", "ema", "brightness", "contrast"):
        if not 0 <= config[key] < 1:
            problems.append(f"--{key} must be in [0, 1), not {config[key]}")
    return problems + muon_problems(config)


def muon_problems(config):
    if config["optimizer"] != "muon":
        return []
    checks = [("lr", config["lr"] > 0, "be positive with --optimizer=muon (Muon's lr is a multiple of it)"),
              ("muon_lr", config["muon_lr"] > 0, "be positive"),
              ("muon_momentum", 0 <= config["muon_momentum"] < 1, "be in [0, 1)"),
              ("muon_weight_decay", config["muon_weight_decay"] >= 0, "not be negative"),
              ("muon_ns_steps", config["muon_ns_steps"] >= 1, "be at least 1"),
              ("muon_norm_every", config["muon_norm_every"] >= 0, "not be negative (0 = off)")]
    return [f"--{key} must {must}, not {config[key]}" for key, ok, must in checks if not ok]


def augment_problems(config):
    """The crop's keys (crop_padding_mode and flip are checked with the other words, in `choices`)."""
    if 0 <= config["crop_padding"] < 32:  # a reflection needs the padding inside the image; more is all padding
        return []
    return [f"--crop_padding must be in [0, 31] (pixels; less than the image's side, 32), not {config['crop_padding']}"]


# The checks every model family makes of its own keys (configs/<family>.py).
def n_outputs(config):
    """The classifier's size, or None where the dataset or its label set is unknown (training_problems says so)."""
    if config["dataset"] in dataset_names() and config["label_mode"] in dataset_entry(config["dataset"]).n_classes:
        return dataset_entry(config["dataset"]).n_classes[config["label_mode"]]
    return None


def model_problems(config, model):
    if config["model"] == model:
        return []
    return [f"--model is the family of this runner's configs, {model}, not '{config['model']}'"]


def size_problems(config, count, keys):
    """An absurd size (`count` parameters, from the family's `keys`) is refused before anything is built."""
    if count <= MAX_PARAMETERS:
        return []
    sizes = ", ".join(f"--{key}={config[key]}" for key in keys)
    give = "give" if len(keys) > 1 else "gives"
    return [f"{sizes} {give} a model of {count:.3g} parameters; at most {MAX_PARAMETERS:,} can be trained "
            "(4 bytes for each weight, its gradient and the optimizer's state of it)"]


def dropout_problems(config):
    return [] if 0 <= config["dropout"] < 1 else [f"--dropout must be in [0, 1), not {config['dropout']}"]


def family_registry(model, family_problems, keys, runner=None):
    """A model family's registry, registered: its root is `{"model": model, **keys, **TRAINING_ROOT}` (the
    family's keys first), its check the shared keys' problems, then `model`'s, then the family's own
    `family_problems(config)` (a list of lines); its runner `src/scripts/train_<model>.py` unless `runner`
    names another."""
    def problems(config):
        return training_problems(config) + model_problems(config, model) + family_problems(config)

    registry = register_family(ConfigRegistry(model, problems, RUNNERS / (runner or f"train_{model}.py")))
    registry.set_root({"model": model, **keys, **TRAINING_ROOT})
    return registry


# SGD 0.1 with momentum 0.9, weight decay 5e-4, batch 128, cosine to 0 over 200 epochs, crops and flips:
# the recipe of kuangliu/pytorch-cifar, which made these CIFAR variants common (configs/preact_resnet.py, vgg.py).
COSINE_RECIPE = dict(dataset="cifar10", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
                     lr_schedule="cosine", n_epochs=200, augment=True)
