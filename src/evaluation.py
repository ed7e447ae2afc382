"""Loss and accuracy of a model on in-memory arrays, without gradients and in large batches."""
import torch
import torch.nn.functional as F

from src.hardware import autocast


def evaluate(model, images, labels, device, precision, batch_size=1024):
    """-> (mean loss, accuracy, predicted labels); restores the model's train/eval mode."""
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
