"""The training stream's crop and flip keys (crop_padding, crop_padding_mode, flip): airbench94's 2-pixel
reflect-padded translation and alternating flip beside the default 4-pixel zero-padded crop and random flip.
Each draw is a pure function of (seed, epoch, batch) or (seed, epoch, image), so a stream resumed anywhere,
or cut into DDP shards, yields what one uninterrupted process yields."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configs.training import TRAINING_ROOT
from src.cli import dispatch_with_overrides
from configs import family
from src.config import apply_overrides
from src.errors import UsageError
from src.datasets.stream import SEED_AUGMENT, TrainStream, derive_seed

LEGACY_CONFIG = Path(__file__).parent / "data" / "run_v1_2c3368b" / "config.json"
AIRBENCH = dict(crop_padding=2, crop_padding_mode="reflect", flip="alternate")


def images_and_labels(n=128, seed=0):
    """Random images (no two windows of one alike) whose label is their index, so a batch names its originals."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(n)


def stream(n=128, batch_size=32, seed=3, shard=(0, 1), **augmentation):
    return TrainStream(*images_and_labels(n), batch_size, seed, True, "cpu", shard).augmentation(**augmentation)


def windows(augmented, originals, padding, mode):
    """For each augmented image, every (dy, dx, flipped) with augmented == that window of its original padded
    by `padding` with F.pad's `mode` ("constant" for zeros), mirrored if flipped."""
    padded = F.pad(originals, (padding,) * 4, mode=mode) if padding else originals
    h, w = originals.shape[2:]
    shifts = [(dy, dx, flipped) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
              for flipped in (False, True)]
    candidates = torch.stack([padded[:, :, dy:dy + h, dx:dx + w].flip(-1) if flipped
                              else padded[:, :, dy:dy + h, dx:dx + w] for dy, dx, flipped in shifts], 1)
    equal = (candidates == augmented[:, None]).flatten(2).all(2)  # (images, shifts)
    return [[shifts[k] for k in row.nonzero().flatten().tolist()] for row in equal]


def draws(s, epochs, padding, mode):
    """{(epoch, image): (dy, dx, flipped)} over `epochs`, each image matching exactly one window."""
    seen = {}
    for epoch in epochs:
        for x, y in s.epoch(epoch):
            for image, found in zip(y.tolist(), windows(x, s.images[y], padding, mode), strict=True):
                assert len(found) == 1, f"image {image} in epoch {epoch} is no single window: {found}"
                seen[epoch, image] = found[0]
    return seen


# ------------------------------------------------------------------ translation


def test_reflect_padding_translates_by_up_to_the_padding_with_mirrored_borders():
    s = stream(n=64, **AIRBENCH)
    seen = draws(s, range(2), 2, "reflect")
    assert len(seen) == 2 * 64
    assert {dy for dy, _, _ in seen.values()} == set(range(5)) == {dx for _, dx, _ in seen.values()}
    # Not the zero-padded windows: at a shift off the centre the border is the image mirrored, not black.
    for x, y in s.epoch(0):
        zero_windows = windows(x, s.images[y], 2, "constant")
        shifted = [i for i, found in enumerate(windows(x, s.images[y], 2, "reflect")) if found[0][:2] != (2, 2)]
        assert shifted and all(zero_windows[i] == [] for i in shifted)


@pytest.mark.parametrize(("padding", "mode"), [(3, "zeros"), (1, "reflect")])
def test_other_paddings_reach_every_shift(padding, mode):
    seen = draws(stream(n=64, batch_size=64, crop_padding=padding, crop_padding_mode=mode), range(4), padding,
                 "constant" if mode == "zeros" else mode)
    assert {dy for dy, _, _ in seen.values()} == set(range(2 * padding + 1)) == {dx for _, dx, _ in seen.values()}


@pytest.mark.parametrize("augmentation", [dict(crop_padding=31, crop_padding_mode="reflect"),
                                          dict(crop_padding=31, flip="alternate"), AIRBENCH])
def test_the_gather_is_pad_then_crop_then_flip_up_to_the_largest_padding(augmentation):
    """The stream's own draws applied the plain way, one image at a time: the one flat gather (and the
    reflection folded into its indices) is that, where a window may lie almost wholly in the padding."""
    s = stream(n=64, **augmentation)
    p, mode = s.crop_padding, "reflect" if s.crop_padding_mode == "reflect" else "constant"
    drawn = set()
    for b, (x, y) in enumerate(s.epoch(1)):
        shifts, flips = s._draws(y, slice(0, 32), 1, b)
        for image, original, (dy, dx), flip in zip(x, s.images[y], shifts.tolist(), flips.tolist(), strict=True):
            window = F.pad(original[None], (p,) * 4, mode=mode)[0, :, dy:dy + 32, dx:dx + 32]
            assert torch.equal(image, window.flip(-1) if flip else window)
            drawn |= {dy, dx}
    assert drawn <= set(range(2 * p + 1)) and len(drawn) >= min(2 * p + 1, 20)  # far into the padding too


def test_no_padding_only_flips():
    s = stream(crop_padding=0)
    flipped = []
    for x, y in s.epoch(1):
        for image, original in zip(x, s.images[y], strict=True):
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
            flipped.append(torch.equal(image, original.flip(-1)))
    assert 0 < sum(flipped) < len(flipped)
    s.augmentation(crop_padding=0, flip="none")  # nothing left to do: the images themselves
    assert all(torch.equal(x, s.images[y]) for x, y in s.epoch(1))


# ------------------------------------------------------------------ flips


def flip_table(s, epochs, padding, mode):
    seen = draws(s, epochs, padding, mode)
    return {e: torch.tensor([seen[e, i][2] for i in range(len(s.images))]) for e in epochs}


def test_alternate_flip_flips_every_image_in_alternate_epochs():
    # Batches of 32 from 64 images: every image is seen every epoch.
    flips = flip_table(stream(n=64, **AIRBENCH), range(6), 2, "reflect")
    assert 0.3 < flips[0].float().mean() < 0.7  # epoch 0: at random, about half
    for e in range(1, 6):
        assert torch.equal(flips[e], ~flips[e - 1])  # each image exactly when it was not in the epoch before
    other_seed = flip_table(stream(n=64, seed=4, **AIRBENCH), [0], 2, "reflect")
    assert not torch.equal(other_seed[0], flips[0])


def test_random_flip_draws_afresh_and_none_never_flips():
    flips = flip_table(stream(n=64, crop_padding=2, crop_padding_mode="reflect"), range(3), 2, "reflect")
    for e in range(1, 3):
        assert 0.3 < flips[e].float().mean() < 0.7
        assert (flips[e] == flips[e - 1]).any() and (flips[e] != flips[e - 1]).any()  # not alternating
    never = flip_table(stream(n=64, crop_padding=2, crop_padding_mode="reflect", flip="none"), range(2), 2,
                       "reflect")
    assert not any(f.any() for f in never.values())


# ------------------------------------------------------------------ resume and shards


CASES = [{}, AIRBENCH, dict(crop_padding=0, flip="alternate"), dict(crop_padding=5, flip="none")]


@pytest.mark.parametrize("augmentation", CASES)
def test_a_stream_resumed_at_any_batch_of_any_epoch_yields_the_same_batches(augmentation):
    uninterrupted = stream(n=100, batch_size=16, **augmentation)
    full = {e: list(uninterrupted.epoch(e)) for e in range(4)}
    for epoch in (3, 1):  # a fresh stream, no epoch before: the alternate flip carries nothing between epochs
        for start in (0, 2, 5):
            resumed = list(stream(n=100, batch_size=16, **augmentation).epoch(epoch, start_batch=start))
            assert len(resumed) == len(full[epoch]) - start
            for (x, y), (fx, fy) in zip(resumed, full[epoch][start:], strict=True):
                assert torch.equal(x, fx) and torch.equal(y, fy)


@pytest.mark.parametrize("augmentation", CASES)
@pytest.mark.parametrize("world_size", [2, 4])
def test_each_shard_is_the_single_process_slice(augmentation, world_size):
    whole = {e: list(stream(n=64, **augmentation).epoch(e)) for e in (0, 1)}
    for rank in range(world_size):
        per_rank = 32 // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for e in (0, 1):
            for (x, y), (wx, wy) in zip(stream(n=64, shard=(rank, world_size), **augmentation).epoch(e), whole[e],
                                        strict=True):
                assert torch.equal(x, wx[mine]) and torch.equal(y, wy[mine])


def test_shards_with_cutout_and_mixup_rebuild_their_partners_as_one_process_does():
    def batches(shard):
        s = stream(shard=shard, **AIRBENCH).regularise(cutout=8, mixup=1.0)
        return [b for e in (0, 1) for b in s.epoch(e)]

    whole = batches((0, 1))
    ranks = [batches((r, 4)) for r in range(4)]
    for i, (x, y, partner_y, lam) in enumerate(whole):
        assert torch.equal(torch.cat([r[i][0] for r in ranks]), x) and all(r[i][3] == lam for r in ranks)
        assert torch.equal(torch.cat([r[i][1] for r in ranks]), y)
        assert torch.equal(torch.cat([r[i][2] for r in ranks]), partner_y)


# ------------------------------------------------------------------ the defaults are the code before the keys


def augment_before_the_keys(s, x, at, epoch, batch):
    """src.datasets.stream's _augment as it was before crop_padding, crop_padding_mode and flip existed."""
    generator = torch.Generator().manual_seed(derive_seed(s.seed, SEED_AUGMENT, epoch, batch))
    shifts = torch.randint(0, 9, (s.batch_size, 2), generator=generator)[at]
    flips = (torch.rand(s.batch_size, generator=generator) < 0.5)[at]
    padded = F.pad(x, (4, 4, 4, 4))
    out = torch.empty_like(x)
    for i, ((dy, dx), flip) in enumerate(zip(shifts.tolist(), flips.tolist(), strict=True)):
        window = padded[i, :, dy:dy + 32, dx:dx + 32]
        out[i] = window.flip(-1) if flip else window
    return out


def test_the_default_augmentation_is_the_code_before_the_keys_bit_for_bit():
    assert {key: TRAINING_ROOT[key] for key in AIRBENCH} == dict(crop_padding=4, crop_padding_mode="zeros",
                                                                 flip="random")
    s = TrainStream(*images_and_labels(100), 16, 5, True, "cpu")  # never told: the defaults
    for epoch in (0, 3):
        for b, (x, y) in enumerate(s.epoch(epoch)):
            assert torch.equal(x, augment_before_the_keys(s, s.images[y], slice(0, 16), epoch, b))


def test_an_old_config_without_the_keys_completes_with_the_defaults():
    saved = json.loads(LEGACY_CONFIG.read_text())
    assert not set(AIRBENCH) & set(saved)
    completed, filled = family("simple_cnn").complete(saved)
    assert set(AIRBENCH) <= set(filled)
    assert {key: completed[key] for key in AIRBENCH} == {key: TRAINING_ROOT[key] for key in AIRBENCH}


def test_the_fast_configs_use_airbench94s_augmentation():
    registry = family("fast")
    for name in ("fast", "airbench94"):
        assert {key: registry.get(name)[key] for key in AIRBENCH} == AIRBENCH
        assert registry.get(name)["augment"] is True


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(("overrides", "says"), [
    ({"crop_padding": "-1"}, "--crop_padding must be in [0, 31] (pixels; less than the image's side, 32), not -1"),
    ({"crop_padding": "32"}, "--crop_padding must be in [0, 31]"),
    ({"crop_padding_mode": "mirror"}, "--crop_padding_mode must be one of zeros, reflect, not 'mirror'"),
    ({"flip": "alternating"}, "--flip must be one of random, alternate, none, not 'alternating'"),
])
@pytest.mark.parametrize("family_name", ["simple_cnn", "fast"])
def test_bad_values_are_refused_in_one_line(family_name, overrides, says):
    registry = family(family_name)
    config = registry.get(registry.names()[0])
    problems = registry.problems(apply_overrides(config, overrides))
    assert len(problems) == 1 and problems[0].startswith(says), problems


@pytest.mark.parametrize("override", ["--crop_padding=40", "--crop_padding_mode=circular", "--flip=sometimes",
                                      "--crop_padding=2.5"])
def test_the_runner_exits_2_with_one_line(override, tmp_path, capsys):
    ran = []
    with pytest.raises(SystemExit) as info:
        dispatch_with_overrides(lambda *args: ran.append(args), family("fast"),
                                ["airbench94", str(tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert info.value.code == 2 and not ran and not (tmp_path / "run").exists()
    assert err.count("\n") == 1 and "Traceback" not in err and override[2:].split("=")[0] in err, err


@pytest.mark.parametrize(("augmentation", "says"), [
    (dict(crop_padding=32, crop_padding_mode="reflect"), "--crop_padding must be in [0, 31]"),
    (dict(crop_padding=-2), "--crop_padding must be in [0, 31]"),
    (dict(crop_padding_mode="edge"), "--crop_padding_mode must be one of zeros, reflect"),
    (dict(flip=True), "--flip must be one of random, alternate, none"),
])
def test_a_stream_refuses_what_it_cannot_do(augmentation, says):
    with pytest.raises(UsageError) as excinfo:
        stream(**augmentation)
    assert str(excinfo.value).startswith(says) and "\n" not in str(excinfo.value)


def test_colour_jitter_is_hivergess_per_image_and_drawn_from_seed_epoch_and_batch():
    """brightness b and contrast c per image, in the standardised image: (x + b) c, with b in [-0.14, 0.14] and c in
    [1 - 0.13, 1 + 0.13]; the crop and flip are those of the same stream without it; a batch drawn again (a
    resume at that batch) is the same; off by default (uint8 out, as before the keys)."""
    plain = stream(**AIRBENCH)
    jittered = stream(**AIRBENCH).jitter(brightness=0.14, contrast=0.13)
    mean, std = plain.mean, plain.std
    draws_b, draws_c = [], []
    for batch, ((x, y), (z, y2)) in enumerate(zip(plain.epoch(3), jittered.epoch(3), strict=True)):
        assert x.dtype == torch.uint8 and z.dtype == torch.float32 and torch.equal(y, y2)
        before, after = ((x.float() - mean) / std).flatten(1), ((z - mean) / std).flatten(1)
        centred = before - before.mean(1, keepdim=True)
        c = (centred * (after - after.mean(1, keepdim=True))).sum(1) / (centred**2).sum(1)
        b = after.mean(1) / c - before.mean(1)
        torch.testing.assert_close(after, (before + b[:, None]) * c[:, None], rtol=0, atol=1e-3)
        draws_b.append(b)
        draws_c.append(c)
        resumed = next(iter(jittered.epoch(3, start_batch=batch)))[0]
        assert torch.equal(resumed, z)
    b, c = torch.cat(draws_b), torch.cat(draws_c)
    assert b.abs().max() <= 0.14 + 1e-4 and (c - 1).abs().max() <= 0.13 + 1e-4
    assert b.std() > 0.05 and (c - 1).std() > 0.05  # spread over the ranges, one draw per image
    other = next(iter(stream(**AIRBENCH).jitter(0.14, 0.13).epoch(4)))[0]
    assert not torch.equal(other, next(iter(jittered.epoch(3)))[0])
