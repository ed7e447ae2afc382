"""What evaluate.py measures (src.evaluation): top-1/top-5, loss, expected calibration error with its bins,
and test-time augmentation's views and averaging, on hand-made logits and models."""
import math

import pytest
import torch
from torch import nn

from src.evaluation import ECE_BINS, calibration, predict, predict_modes, scores, views


def test_top1_top5_and_loss_on_hand_made_logits():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 0], [0, 9, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([0, 0, 2])  # right; 6th best; 5th best
    result = scores(logits, labels)
    assert result["acc"] == pytest.approx(1 / 3)
    assert result["top5"] == pytest.approx(2 / 3)
    expected = -sum(torch.log_softmax(logits.double(), 1)[i, y].item() for i, y in enumerate(labels)) / 3
    assert result["loss"] == pytest.approx(expected)


def test_top5_with_fewer_than_5_classes_counts_every_class():
    assert scores(torch.tensor([[0.0, 1, 2]]), torch.tensor([0]))["top5"] == 1.0


def test_ece_by_hand_with_15_equal_width_bins():
    # Confidences 0.9 (right), 0.9 (wrong), 0.5 (right): two bins. ECE = 2/3 * |0.5 - 0.9| + 1/3 * |1 - 0.5|.
    def logits_for(confidence):
        return [math.log(confidence), math.log(1 - confidence)]

    logits = torch.tensor([logits_for(0.9), logits_for(0.9), logits_for(0.5 + 1e-9)])
    labels = torch.tensor([0, 1, 0])
    ece, bins = calibration(logits, labels)
    assert len(bins) == ECE_BINS == 15
    assert ece == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.5, abs=1e-6)
    assert [b["count"] for b in bins].count(0) == 13 and sum(b["count"] for b in bins) == 3
    high = next(b for b in bins if b["lower"] < 0.9 <= b["upper"])
    assert high["count"] == 2 and high["accuracy"] == 0.5 and high["confidence"] == pytest.approx(0.9)
    assert bins[0]["lower"] == 0 and bins[-1]["upper"] == 1 and bins[1]["lower"] == pytest.approx(1 / 15)
    assert scores(logits, labels)["ece"] == pytest.approx(ece)


def test_a_perfectly_calibrated_prediction_has_no_error():
    logits = torch.tensor([[0.0, 0.0]] * 4)  # confidence 0.5, half right
    assert calibration(logits, torch.tensor([0, 1, 0, 1]))[0] == pytest.approx(0)


def test_flip_and_shift_views():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32).to(torch.uint8)
    assert len(views(x, None)) == 1 and views(x, None)[0] is x
    plain, mirror = views(x, "flip")
    assert torch.equal(mirror[..., 0], x[..., 31]) and torch.equal(plain, x)
    shifted = views(x, "flip+shift")
    assert len(shifted) == 10 and all(v.shape == x.shape and v.dtype == torch.uint8 for v in shifted)
    assert torch.equal(shifted[0], x) and torch.equal(shifted[5], x.flip(3))
    assert sum(torch.equal(v[:, :, 2:, :], x[:, :, :-2, :]) and not v[:, :, :2, :].any() for v in shifted) == 1


class LeftBright(nn.Module):
    """Not mirror-symmetric: class 0's logit is the left half's brightness, class 1's the right half's."""

    def forward(self, x):
        x = x.float() / 255
        return torch.stack([x[..., :16].mean((1, 2, 3)), x[..., 16:].mean((1, 2, 3))], 1) * 10


def test_tta_averages_the_probabilities_of_the_views_and_leaves_the_model_as_it_was():
    model = LeftBright().train()
    x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    x[..., :16] = 200
    plain = predict(model, x, "cpu")
    flipped = predict(model, x, "cpu", tta="flip")
    assert model.training
    assert plain.argmax(1).tolist() == [0, 0, 0]
    assert torch.allclose(flipped.softmax(1), torch.full((3, 2), 0.5))  # the image and its mirror disagree equally
    probabilities = torch.stack([model(v).softmax(1) for v in views(x, "flip+shift")]).mean(0)
    assert torch.allclose(predict(model, x, "cpu", tta="flip+shift").softmax(1), probabilities, atol=1e-6)
    assert torch.equal(predict(model, x, "cpu", batch_size=2), plain)  # batches change nothing


def test_the_modes_share_their_views_and_give_what_each_alone_gives():
    calls = []

    class Counting(LeftBright):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    model = Counting()
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    together = predict_modes(model, x, "cpu", (None, "flip", "flip+shift"), batch_size=4)
    assert len(calls) == 2 * 10  # two batches, each view once
    for mode in (None, "flip", "flip+shift"):
        assert torch.equal(together[mode], predict(model, x, "cpu", tta=mode, batch_size=4)), mode


def test_airbench_tta_weighs_the_logits_of_its_six_views_as_airbench94_infers():
    """airbench94_muon.py's infer(tta_level=2): 0.5 mirror(x) + 0.5 mean(mirror(up-left), mirror(down-right)),
    mirror(v) = 0.5 f(v) + 0.5 f(flip(v)), the moves one pixel in a reflect-padded image."""
    model = LeftBright()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def mirror(v):
        return 0.5 * model(v) + 0.5 * model(v.flip(-1))

    padded = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="reflect")
    moved = (mirror(padded[:, :, 0:32, 0:32]) + mirror(padded[:, :, 2:34, 2:34])) / 2
    expected = 0.5 * mirror(x) + 0.5 * moved
    torch.testing.assert_close(predict(model, x, "cpu", tta="airbench"), expected, rtol=0, atol=1e-5)
    both = predict_modes(model, x, "cpu", (None, "flip", "airbench"), batch_size=3)
    assert torch.equal(both["airbench"], predict(model, x, "cpu", tta="airbench", batch_size=3))
    assert torch.equal(both["flip"], predict(model, x, "cpu", tta="flip", batch_size=3))


def test_hiverge_tta_replaces_the_least_confident_quarter_with_the_mean_of_six_views():
    """cifar10_speedrun.py's tta: plain logits; for the int(0.25 n) images of lowest top probability, the plain mean
    of the logits of the image, its 1-pixel up-left and down-right moves (reflect padding) and their mirrors."""
    from src.evaluation import airbench_views

    model = LeftBright()
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plain = predict(model, x, "cpu")
    least = set(plain.softmax(1).max(1).values.topk(3, largest=False).indices.tolist())
    result = predict(model, x, "cpu", tta="hiverge", batch_size=5)
    for i in range(12):
        if i in least:
            expected = torch.stack([model(view) for view in airbench_views(x[i:i + 1])]).mean(0)[0]
            torch.testing.assert_close(result[i], expected, rtol=0, atol=1e-5)
        else:
            assert torch.equal(result[i], plain[i])
    assert torch.equal(predict_modes(model, x, "cpu", (None, "hiverge"), batch_size=5)["hiverge"], result)
