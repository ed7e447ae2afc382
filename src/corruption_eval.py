"""evaluate.py --test_set=cifar10c: accuracy per corruption and severity, and the means, for each model.

Each corruption's 5 x 10,000 images are read once (150 MB) and every model evaluated on them before the
next is read, so memory holds one corruption at a time. No per-example predictions are saved here: they
would be 19 x 50,000 rows per model.
"""
from src.shift_sets import COMMON_CORRUPTIONS, SEVERITIES, Cifar10C


def evaluate_corruptions(models, data_dir, corruptions, ttas, device):
    """-> what eval_cifar10c.json holds beside the run's facts: per model (and per TTA mode, suffix _<mode>),
    `<model>_cifar10c_acc` (the mean over every corruption and severity evaluated), `..._acc_common` (over
    the benchmark's 15, when all were evaluated), `..._per_corruption` ({corruption: [accuracy at severity
    1..5]}) and `..._per_severity` (the mean over corruptions at each severity)."""
    import torch

    from src.evaluation import predict_modes

    modes = [None, *ttas]
    table = {(which, mode): {} for which in models for mode in modes}
    with Cifar10C(data_dir, corruptions) as source:
        labels, n = torch.from_numpy(source.labels), source.per_severity
        for corruption in corruptions:
            images = torch.from_numpy(source.images(corruption))
            for which, model in models.items():  # each view run once, shared by the modes
                for mode, logits in predict_modes(model, images, device, modes).items():
                    correct = (logits.argmax(1) == labels).double()
                    table[which, mode][corruption] = [correct[s * n:(s + 1) * n].mean().item()
                                                      for s in range(SEVERITIES)]
            print(f"{corruption:18}" + "  ".join(f"{which}{'' if mode is None else '+' + mode} "
                                                 f"{sum(acc[corruption]) / SEVERITIES:.4f}"
                                                 for (which, mode), acc in table.items()), flush=True)
    result = {"corruptions": corruptions, "severities": list(range(1, SEVERITIES + 1)), "n_per_severity": n}
    for (which, mode), accuracies in table.items():
        numbers = summary(which, mode, accuracies)
        result.update(numbers)
        suffix = "" if mode is None else f"_{mode}"
        print_table(which, mode, accuracies, numbers[f"{which}_cifar10c_per_severity{suffix}"])
    return result


def summary(which, mode, accuracies):
    suffix = "" if mode is None else f"_{mode}"
    every = [a for per_severity in accuracies.values() for a in per_severity]
    out = {f"{which}_cifar10c_acc{suffix}": sum(every) / len(every)}
    if all(c in accuracies for c in COMMON_CORRUPTIONS):
        common = [a for c in COMMON_CORRUPTIONS for a in accuracies[c]]
        out[f"{which}_cifar10c_acc_common{suffix}"] = sum(common) / len(common)
    out[f"{which}_cifar10c_per_corruption{suffix}"] = accuracies
    out[f"{which}_cifar10c_per_severity{suffix}"] = [
        sum(acc[s] for acc in accuracies.values()) / len(accuracies) for s in range(SEVERITIES)]
    return out


def print_table(which, mode, accuracies, means):
    """`means`: the mean over corruptions at each severity, as `summary` gave it."""
    title = f"{which} model" + ("" if mode is None else f", --tta={mode}")
    print(f"\n{title}: CIFAR-10-C accuracy")
    print(f"{'corruption':18}" + "".join(f"{'severity ' + str(s):>12}" for s in range(1, SEVERITIES + 1))
          + f"{'mean':>8}")
    for corruption, per_severity in accuracies.items():
        print(f"{corruption:18}" + "".join(f"{a:12.4f}" for a in per_severity)
              + f"{sum(per_severity) / SEVERITIES:8.4f}")
    print(f"{'mean':18}" + "".join(f"{a:12.4f}" for a in means) + f"{sum(means) / SEVERITIES:8.4f}")
