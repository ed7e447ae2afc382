"""Loss and accuracy of a model on in-memory arrays, without gradients and in large batches; the test-time
views, calibration and confusion that evaluate.py reports; and the per-corruption accuracy of CIFAR-10-C."""
import torch
import torch.nn.functional as F

from src.datasets.shift_sets import COMMON_CORRUPTIONS, SEVERITIES, Cifar10C
from src.training.hardware import autocast

# On a CPU, batches past about 128 images make a small convnet's activations outgrow the caches: the validation of
# the default model on a 2-core AVX2 EPYC (32 MB L3) ran at 3900-5600 images/s at batches of 64-128, 3400-3800
# at 256 and 2000-3100 at 512; ResNet-20 and the fast net lost 25-40% at 512 too (3 December 2026, interleaved).
# On CUDA a large batch keeps the GPU busy.
CPU_EVALUATION_BATCH = 128


def evaluation_batch(device, training_batch=256):
    """The batch to evaluate in: four training batches on CUDA, at most CPU_EVALUATION_BATCH on a CPU."""
    cuda = torch.device(device).type == "cuda"
    return 4 * training_batch if cuda else min(4 * training_batch, CPU_EVALUATION_BATCH)


def evaluate(model, images, labels, device, precision, batch_size=None):
    """-> (mean loss, accuracy, predicted labels); restores the model's train/eval mode. `batch_size`: default
    `evaluation_batch(device)`."""
    batch_size = batch_size or evaluation_batch(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    predictions = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            predictions.append(logits.argmax(1))
    model.train(was_training)
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long, device=device)
    n = max(len(labels), 1)
    accuracy = (predicted == labels.to(device)).sum().item() / n
    return loss_sum.item() / n, accuracy, predicted.cpu()


def validation_columns(model, images, labels, device, precision, batch_size, prefix=""):
    """The log row's `{prefix}valid_loss` and `{prefix}valid_acc` (plain cross-entropy, whatever the training
    loss is, so runs stay comparable); None for an empty validation split."""
    loss = accuracy = None
    if len(images):
        loss, accuracy, _ = evaluate(model, images, labels, device, precision, batch_size=batch_size)
    return {f"{prefix}valid_loss": loss, f"{prefix}valid_acc": accuracy}


# --- what evaluate.py measures: logits (with test-time augmentation), then scores from them -----------------

TTA_MODES = ("flip", "flip+shift", "airbench", "hiverge")
SHIFT = 2  # pixels; the training crops move images by up to 4 (zero padding), so 2 stays well inside that
ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) and most papers since measure ECE
SHIFTS = ((0, 0), (-SHIFT, 0), (SHIFT, 0), (0, -SHIFT), (0, SHIFT))  # each mirror's views under flip+shift
MODE_ORDER = (None, "flip", "flip+shift")  # each mode's views hold the one before's: the last holds them all
# airbench94's (and airbench94_muon's) tta_level=2, as its `infer`: the logits (not probabilities) of the image and
# its mirror at 1/4 each, and of both moved one pixel up-left and down-right (reflect padding) at 1/8 each.
AIRBENCH_WEIGHTS = (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)
# hiverge's speedrun (cifar10_speedrun.py, commit 828bcd7): the plain logits, except for the quarter of the images
# least confident in them, whose logits are the plain mean of the same six views'.
HIVERGE_QUANTILE = 0.25


def views(x, tta):
    """The images a test-time augmentation averages over: `None` the image alone; `flip` it and its mirror;
    `flip+shift` both, each also moved SHIFT pixels up, down, left and right (zero fill, as the training
    crops pad): 10 views."""
    if tta is None:
        return [x]
    mirrors = [x, x.flip(3)]
    if tta == "flip":
        return mirrors
    shifted = []
    for image in mirrors:
        padded = F.pad(image, (SHIFT, SHIFT, SHIFT, SHIFT))
        height, width = image.shape[2:]
        for dy, dx in SHIFTS:
            shifted.append(image if (dy, dx) == (0, 0) else
                           padded[:, :, SHIFT + dy:SHIFT + dy + height, SHIFT + dx:SHIFT + dx + width])
    return shifted



def airbench_views(x):
    """The image, its mirror, then each moved one pixel up-left and down-right (reflect padding) and its mirror."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    height, width = x.shape[2:]
    moved = [padded[:, :, :height, :width], padded[:, :, 2:2 + height, 2:2 + width]]
    return [x, x.flip(3), *(view for image in moved for view in (image, image.flip(3)))]


def view_indices(mode, largest):
    """Which of `views(x, largest)` make up `mode`'s views: the image comes first in every mode, and its
    unshifted mirror after the image's shifts."""
    if mode is None:
        return [0]
    if mode == largest:
        return list(range(len(SHIFTS) * 2 if mode == "flip+shift" else 2))
    return [0, len(SHIFTS)]  # flip within flip+shift


def predict(model, images, device, tta=None, batch_size=None):
    """-> float32 logits (N, classes) on the CPU, in fp32 and eval mode. With `tta`, the log of the mean of
    the views' softmax probabilities: its softmax is the averaged prediction, so every score below reads it
    as it reads plain logits."""
    return predict_modes(model, images, device, (tta,), batch_size)[tta]


def predict_modes(model, images, device, modes, batch_size=None):
    """-> {mode: what `predict` gives with tta=mode} for each of `modes`, with every view run once per batch
    however many modes share it (plain, flip and flip+shift together: 10 forward passes, not 13)."""
    batch_size = batch_size or evaluation_batch(device)
    chained = [mode for mode in modes if mode in MODE_ORDER]
    if "hiverge" in modes and None not in chained:  # it starts from the plain logits
        chained.append(None)
    largest = max(chained, key=MODE_ORDER.index) if chained else None
    was_training = model.training
    model.eval()
    outputs = {mode: [] for mode in dict.fromkeys([*chained, *modes])}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            logits = [model(view).float() for view in views(x, largest)] if chained else []
            for mode in chained:
                outputs[mode].append(average([logits[i] for i in view_indices(mode, largest)]).cpu())
            if "airbench" in outputs:  # its own views, its logits weighted as airbench94 weighs them
                views_logits = [model(view).float() for view in airbench_views(x)]
                outputs["airbench"].append(sum(w * z for w, z in zip(AIRBENCH_WEIGHTS, views_logits,
                                                                      strict=True)).cpu())
        if "hiverge" in outputs:
            plain = torch.cat(outputs[None])
            outputs["hiverge"] = [least_confident_again(model, images, plain, device, batch_size)]
    model.train(was_training)
    return {mode: torch.cat(outputs[mode]) if outputs[mode] else torch.zeros(0, 0) for mode in modes}


def least_confident_again(model, images, plain, device, batch_size):
    """hiverge's selective TTA: `plain` logits with those of the HIVERGE_QUANTILE least confident images (top
    softmax probability) replaced by the mean logits of their six airbench views."""
    k = int(len(images) * HIVERGE_QUANTILE)
    chosen = plain.softmax(1).max(1).values.topk(k, largest=False).indices
    result = plain.clone()
    for start in range(0, k, batch_size):
        which = chosen[start:start + batch_size]
        x = images[which].to(device, non_blocking=True)
        result[which] = torch.stack([model(view).float() for view in airbench_views(x)]).mean(0).cpu()
    return result


def average(logits):
    """One view's logits as they are; several views': the log of the mean of their softmax probabilities."""
    if len(logits) == 1:
        return logits[0]
    probabilities = torch.stack([z.softmax(1) for z in logits]).mean(0)
    return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()


def scores(logits, labels):
    """Loss (mean cross-entropy), top-1 and top-5 accuracy (top-k with k = min(5, classes)), and the expected
    calibration error with its reliability bins, of `logits` (N, classes) against int64 `labels` (N,)."""
    n = max(len(labels), 1)
    k = min(5, logits.shape[1])
    top_k = logits.topk(k, dim=1).indices
    ece, reliability = calibration(logits, labels)
    return {"loss": F.cross_entropy(logits.double(), labels, reduction="sum").item() / n,
            "acc": (top_k[:, 0] == labels).sum().item() / n,
            "top5": (top_k == labels[:, None]).any(1).sum().item() / n,
            "ece": ece, "reliability": reliability}


def calibration(logits, labels, n_bins=ECE_BINS):
    """-> (ECE, bins): confidence (the top class's probability) in `n_bins` equal-width bins (lower, upper];
    ECE = sum over bins of |accuracy - mean confidence| weighted by the bin's share of the images."""
    probabilities = logits.double().softmax(1)
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1])  # bin i holds (edges[i], edges[i + 1]]
    count = torch.bincount(which, minlength=n_bins)
    right = torch.bincount(which, weights=correct, minlength=n_bins)
    sure = torch.bincount(which, weights=confidence, minlength=n_bins)
    bins, ece = [], 0.0
    for i in range(n_bins):
        c = int(count[i])
        accuracy, mean_confidence = (right[i].item() / c, sure[i].item() / c) if c else (None, None)
        if c:
            ece += c / max(len(labels), 1) * abs(accuracy - mean_confidence)
        bins.append({"lower": edges[i].item(), "upper": edges[i + 1].item(), "count": c, "accuracy": accuracy,
                     "confidence": mean_confidence})
    return ece, bins


def confusion_matrix(true, predicted, n):
    """counts[i, j]: images of class i predicted as j (numpy int64 arrays in, numpy out)."""
    import numpy as np

    return np.bincount(true * n + predicted, minlength=n * n).reshape(n, n)


# --- evaluate.py --test_set=cifar10c: accuracy per corruption and severity, and the means, for each model ---
# Each corruption's 5 x 10,000 images are read once (150 MB) and every model evaluated on them before the
# next is read, so memory holds one corruption at a time. No per-example predictions are saved here: they
# would be 19 x 50,000 rows per model.


def evaluate_corruptions(models, data_dir, corruptions, ttas, device):
    """-> what eval_cifar10c.json holds beside the run's facts: per model (and per TTA mode, suffix _<mode>),
    `<model>_cifar10c_acc` (the mean over every corruption and severity evaluated), `..._acc_common` (over
    the benchmark's 15, when all were evaluated), `..._per_corruption` ({corruption: [accuracy at severity
    1..5]}) and `..._per_severity` (the mean over corruptions at each severity)."""
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
