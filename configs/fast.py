"""Named configs for `src/scripts/train_fast.py`: the fast family (src/networks/fast.py), after KellerJordan's
airbench94, the public CIFAR-10 speed record, and its recipe."""
from configs.training import family_registry, n_outputs, size_problems
from src.networks.fast import ACTIVATIONS, fast_parameters
from src.training.optim import TRIANGLE

HEAD_INITS = ("default", "unit_std")
WHITEN_BIAS_DECAYS = ("schedule", "linear")
N_GROUPS = 3  # 31x31 after the whitening, halved three times to 3x3, then one 3x3 max-pool: 1x1


def family_problems(config):
    """This family's problems (configs.training adds the shared keys'); a list of lines."""
    problems = []
    widths = config["widths"]
    if not (len(widths) == N_GROUPS and all(type(w) is int and w >= 1 for w in widths)):
        problems.append(f"--widths must be {N_GROUPS} positive integers (each group's channels; airbench's "
                        f"[64,256,256]), not {widths}")
    elif n_outputs(config):
        problems += size_problems(config, fast_parameters(widths, n_outputs(config)), ["widths"])
    # 0 would freeze the running statistics at their start (every validation then wrong): refused.
    checks = [("bn_momentum", 0 < config["bn_momentum"] <= 1, "be in (0, 1]: 0 never updates the running statistics"),
              ("whiten_images", config["whiten_images"] >= 1, "be at least 1"),
              ("whiten_bias_epochs", config["whiten_bias_epochs"] >= 0, "not be negative"),
              ("bias_lr_scale", config["bias_lr_scale"] > 0, "be positive"),
              ("logit_scale", config["logit_scale"] > 0, "be positive"),
              ("lr_peak", 0 <= config["lr_peak"] < 1, "be in [0, 1) (a fraction of training)"),
              ("lr_start", config["lr_start"] >= 0, "not be negative"),
              ("lr_end", config["lr_end"] >= 0, "not be negative"),
              ("lookahead_every", config["lookahead_every"] >= 0, "not be negative (0 turns Lookahead off)"),
              ("lookahead_decay", 0 <= config["lookahead_decay"] <= 1, "be in [0, 1]"),
              ("head_init", config["head_init"] in HEAD_INITS, f"be one of {', '.join(HEAD_INITS)}"),
              ("head_lr_scale", config["head_lr_scale"] >= 0, "not be negative (0: the head trains with the rest)"),
              ("whiten_bias_decay", config["whiten_bias_decay"] in WHITEN_BIAS_DECAYS,
               f"be one of {', '.join(WHITEN_BIAS_DECAYS)}"),
              ("activation", config["activation"] in ACTIVATIONS, f"be one of {', '.join(ACTIVATIONS)}")]
    if config["whiten_bias_decay"] == "linear" and not config["whiten_bias_epochs"] > 0:
        problems.append("--whiten_bias_decay=linear needs --whiten_bias_epochs above 0 (its line ends there)")
    problems += [f"--{key} must {must}, not {config[key]}" for key, ok, must in checks if not ok]  # nan fails too
    return problems


fast_configs = family_registry("fast", family_problems, {
    "widths": [64, 256, 256],  # the three conv groups' channels
    "bn_momentum": 0.4,  # batch norm's running statistics, PyTorch's sense (airbench's 0.6 is 1 minus this)
    "logit_scale": 1 / 9,  # the logits are multiplied by it
    "whiten_images": 5000,  # training images the whitening filters are computed from
    "whiten_bias_epochs": 3.0,  # epochs (a fraction: ceil(this x batches per epoch) steps) its bias trains for
    "bias_lr_scale": 64.0,  # batch-norm biases: lr times this, weight decay divided by it
    **TRIANGLE,  # lr_schedule=triangle: lr_start * lr up to lr at the fraction lr_peak, down to lr_end * lr
    "lookahead_every": 0,  # Lookahead (src.training.optim): steps between pulls towards the slow weights; 0 = off
    "lookahead_decay": 0.95,  # per step: a pull at iteration t of T keeps decay**every * (t / T)**3 of the slow
    "head_init": "default",  # default (PyTorch's) | unit_std (then divided by the weights' std: airbench94_muon)
    "head_lr_scale": 0.0,  # > 0: the head at lr times this, weight decay divided by it; 0 = with the rest
    "whiten_bias_decay": "schedule",  # the whitening bias's lr: schedule (the run's) | linear (to 0 when it freezes)
    "activation": "gelu",  # in the conv groups: gelu (airbench's) | silu (hiverge's); after the whitening, GELU
})

# airbench94's hyperparameters, converted. It sums the loss over the batch and writes lr and weight decay
# "per 1024 examples", decoupled from the momentum: lr 11.5 / (1024 (1 + 1 / (1 - 0.85))), weight decay
# 0.0153 * 1024 / (1024 (1 + 1 / (1 - 0.85))) / lr per summed-loss gradient. Our loss is the batch's mean (the
# gradient 1/1024 of the sum's), so the same steps are lr 11.5 * 0.15 / 1.15 = 1.5 and weight decay
# 0.0153 / 11.5: lr * (mean gradient + wd * w) is then airbench's step exactly.
AIRBENCH_RECIPE = dict(dataset="cifar10", optimizer="nesterov", lr=1.5, momentum=0.85, weight_decay=0.0153 / 11.5,
                       batch_size=1024, label_smoothing=0.2, lr_schedule="triangle", n_epochs=10, augment=True,
                       crop_padding=2, crop_padding_mode="reflect", flip="alternate",  # its translate=2, flip=True
                       lookahead_every=5, lookahead_decay=0.95)
# The baseline to start from: the recipe with the usual 5,000 validation images held out.
fast_configs.derive("fast", **AIRBENCH_RECIPE, valid_size=5000)
# The record's setting: all 50,000 training images (no validation; the test accuracy is evaluate.py's).
fast_configs.derive("airbench94", **AIRBENCH_RECIPE, valid_size=0)

# airbench94_muon (KellerJordan/cifar10-airbench, airbench94_muon.py at commit 096d14d; docs/models.md): the
# same net with its head at 1/256 from a unit-std init, 8 epochs of batch 2000, Muon on the conv filter banks
# (lr 0.24, momentum 0.6, Nesterov, 3 bf16 Newton-Schulz steps, each bank projected to norm sqrt(out) every
# step), Nesterov SGD (momentum 0.85) on the rest, every lr falling linearly to 0, no Lookahead. It sums the
# loss, with SGD lrs 0.053 (biases) and 0.67 (head) and weight decay 2e-6 * batch / lr: on our mean loss the
# same steps are lr 0.053 * 2000 and weight decay 2e-6 * 2000 / 0.053 / 2000 (Muon normalises its update,
# so its lr is unchanged). The whitening bias's lr falls from 0.053 * 2000 to 0 over its 3 epochs.
MUON_BATCH = 2000
AIRBENCH_MUON_RECIPE = dict(
    dataset="cifar10", batch_size=MUON_BATCH, n_epochs=8, label_smoothing=0.2, augment=True, crop_padding=2,
    crop_padding_mode="reflect", flip="alternate", optimizer="muon", lr=0.053 * MUON_BATCH, momentum=0.85,
    weight_decay=2e-6 * MUON_BATCH / 0.053 / MUON_BATCH, bias_lr_scale=1.0, head_lr_scale=0.67 / 0.053,
    muon_lr=0.24, muon_momentum=0.6, muon_ns_steps=3, muon_coefficients="airbench", muon_ns_dtype="bfloat16",
    muon_norm_every=1, lr_schedule="linear", logit_scale=1 / 256, head_init="unit_std", whiten_bias_epochs=3,
    whiten_bias_decay="linear", lookahead_every=0)
fast_configs.derive("airbench94_muon", **AIRBENCH_MUON_RECIPE, valid_size=0)

# hiverge/cifar10-speedrun's record (cifar10_speedrun.py at commit 828bcd7; docs/models.md): the same net with SiLU
# in its groups, batch-norm momentum 1 - 0.5566, whitening from 960 images whose bias trains for its first
# ceil(0.19 x 32) = 7 steps; 243 steps of batch 1536 (8 epochs, the last cut at 19 of 32 batches); Muon at 0.205,
# momentum 0.655, 3 fp16 steps of its coefficients, decoupled weight decay 1.0418e-6 x 1536, each bank
# projected to norm sqrt(out) on its interval schedule; Nesterov SGD (momentum 0.825) with lrs 0.0573 (biases)
# and 0.5415 (head) and weight decay 1.0418e-6 x 1536 / lr on its summed loss (converted as airbench94_muon's);
# label smoothing 0.09; brightness and contrast jitter 0.1399 and 0.1308.
SPEEDRUN_BATCH = 1536
SPEEDRUN_WD = 1.0418e-6 * SPEEDRUN_BATCH
SPEEDRUN_RECIPE = dict(
    dataset="cifar10", batch_size=SPEEDRUN_BATCH, n_epochs=8, n_iterations=243, label_smoothing=0.09, augment=True,
    crop_padding=2, crop_padding_mode="reflect", flip="alternate", brightness=0.1399, contrast=0.1308,
    optimizer="muon", lr=0.0573 * SPEEDRUN_BATCH, momentum=0.825, weight_decay=SPEEDRUN_WD / 0.0573 / SPEEDRUN_BATCH,
    bias_lr_scale=1.0, head_lr_scale=0.5415 / 0.0573, muon_lr=0.205, muon_momentum=0.655,
    muon_weight_decay=SPEEDRUN_WD, muon_ns_steps=3, muon_coefficients="hiverge", muon_ns_dtype="float16",
    muon_norm_every=0, muon_norm_schedule="hiverge", lr_schedule="linear", logit_scale=1 / 256,
    head_init="unit_std", whiten_images=960, whiten_bias_epochs=0.19, whiten_bias_decay="linear",
    bn_momentum=1 - 0.5566, activation="silu", lookahead_every=0)
fast_configs.derive("speedrun", **SPEEDRUN_RECIPE, valid_size=0)
