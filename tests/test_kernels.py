"""The run's precision and memory format (src.training.kernels): the config's, a resumed run's own, the fastest of
a timing trial, or the rule older code used. No test asserts a speed: the trial's rates are replaced by
fixed numbers where the choice itself is tested, and only its traces (none) are checked where it really runs."""
import json

import pytest
import torch
from torch import nn

from conftest import TINY, TRAIN_SCRIPT, assert_identical, kill_mid_epoch
from src.runs.checkpoints import list_checkpoints, load_tensors
from src.training import kernels
from src.training.kernels import Kernels, choose_kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AUTO = {"precision": "auto", "memory_format": "auto"}
LONG = 10_000  # steps in a run: enough for a trial
# 15 batches per epoch at TINY's settings: 20 epochs are 300 steps, the least for which the trial of two
# candidates (3 steps each) is within TRIAL_SHARE (2%) of the run.
TRIAL_EPOCHS = "--n_epochs=20"


@pytest.fixture
def avx2(monkeypatch):
    """A CPU with AVX2 only: fp32 is the one native precision."""
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma"})


def never_timed(pairs):
    raise AssertionError(f"no trial was due, yet {pairs} were timed")


def rates(**by_name):
    """A trial's result with the given images/s, e.g. rates(fp32_channels_last=2.0)."""
    return lambda pairs: {"images_per_second": {tuple(name.split("_", 1)): by_name[name] for name in
                                                (f"{p}_{f}" for p, f in pairs)}, "rounds": 2, "seconds": 0.1}


def test_candidates_are_every_native_precision_in_both_formats_unless_the_config_says(monkeypatch, avx2):
    assert kernels.candidates("auto", "auto", CPU) == [("fp32", "contiguous"), ("fp32", "channels_last")]
    assert kernels.candidates("auto", "channels_last", CPU) == [("fp32", "channels_last")]
    assert kernels.candidates("bf16", "auto", CPU) == [("bf16", "contiguous"), ("bf16", "channels_last")]
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_fp16"})
    assert [p for p, _ in kernels.candidates("auto", "contiguous", CPU)] == ["fp32", "bf16", "fp16"]
    for has_bf16, half in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(kernels, "cuda_has_bf16", lambda device, has=has_bf16: has)
        assert kernels.candidates("auto", "auto", CUDA) == [("fp32", "contiguous"), ("fp32", "channels_last"),
                                                            (half, "contiguous"), (half, "channels_last")]


def test_a_fresh_run_takes_the_fastest_candidate_of_its_trial(avx2):
    chosen = choose_kernels(AUTO, CPU, None, LONG, rates(fp32_contiguous=880.0, fp32_channels_last=1154.0))
    assert (chosen.precision, chosen.memory_format, chosen.chosen_by) == ("fp32", "channels_last", "trial")
    assert chosen.record()["kernel_trial"]["images_per_second"] == {"fp32 contiguous": 880.0,
                                                                    "fp32 channels_last": 1154.0}
    chosen = choose_kernels(AUTO, CPU, None, LONG, rates(fp32_contiguous=900.0, fp32_channels_last=800.0))
    assert chosen.memory_format == "contiguous"


def test_explicit_settings_skip_the_trial(avx2):
    chosen = choose_kernels({"precision": "fp32", "memory_format": "channels_last"}, CPU, None, LONG, never_timed)
    assert chosen == Kernels("fp32", "channels_last", "config")
    # precision=auto with one native precision and an explicit format: one candidate, nothing to time
    assert choose_kernels({**AUTO, "memory_format": "contiguous"}, CPU, None, LONG, never_timed).chosen_by == "config"


def test_a_run_too_short_to_time_takes_the_rule_older_code_used(avx2, monkeypatch):
    short = int(2 * (1 + kernels.MIN_ROUNDS) / kernels.TRIAL_SHARE) - 1
    assert choose_kernels(AUTO, CPU, None, short, never_timed) == Kernels("fp32", "contiguous", "rule")
    assert choose_kernels({**AUTO, "precision": "bf16"}, CPU, None, short, never_timed) == Kernels(
        "bf16", "channels_last", "rule")
    assert choose_kernels(AUTO, CPU, None, short + 1, rates(fp32_contiguous=1.0, fp32_channels_last=2.0)).chosen_by \
        == "trial"


def test_a_resumed_run_keeps_the_choice_of_its_sessions_and_an_old_folder_the_old_rule(avx2):
    chose = {"device": "cpu", "precision": "fp32", "memory_format": "channels_last", "kernels_chosen_by": "trial"}
    assert choose_kernels(AUTO, CPU, [chose], LONG, never_timed) == Kernels("fp32", "channels_last", "recorded")
    # meta.json of code older than the trial: the format that code used with the recorded precision
    assert choose_kernels(AUTO, CPU, [{"device": "cpu", "precision": "fp32"}], LONG, never_timed) == Kernels(
        "fp32", "contiguous", "recorded")
    old_bf16 = {"device": "cpu", "precision": "bf16"}
    assert choose_kernels(AUTO, CPU, [old_bf16], LONG, never_timed) == Kernels("bf16", "channels_last", "recorded")
    # the last session on this kind of device counts; none (a lost meta.json), or nonsense in it: the rule
    on_gpu = {"device": "cuda:0", "precision": "bf16", "memory_format": "contiguous"}
    assert choose_kernels(AUTO, CPU, [chose, on_gpu], LONG, never_timed).memory_format == "channels_last"
    assert choose_kernels(AUTO, CPU, [on_gpu], LONG, never_timed) == Kernels("fp32", "contiguous", "rule")
    assert choose_kernels(AUTO, CPU, [], LONG, never_timed) == Kernels("fp32", "contiguous", "rule")
    nonsense = {"device": "cpu", "precision": "as on another machine", "memory_format": [1]}
    assert choose_kernels(AUTO, CPU, [nonsense], LONG, never_timed) == Kernels("fp32", "contiguous", "rule")


class Dropped(nn.Module):
    """Batch norm (running statistics), dropout (the global random stream) and a Standardize-like flag."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)
        self.channels_last = False

    def forward(self, x):
        x = x.float().contiguous(memory_format=torch.channels_last) if self.channels_last else x.float()
        x = nn.functional.dropout(self.norm(self.conv(x)), 0.5, training=self.training)
        return self.head(x.mean((2, 3)))


def test_the_trial_times_every_candidate_and_leaves_the_model_and_random_streams_as_they_were():
    from configs.simple_cnn import simple_cnn_configs

    torch.manual_seed(0)
    model = Dropped()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=generator),
                torch.randint(0, 10, (8,), generator=generator)) for _ in range(2)]

    def convert(copy, memory_format):
        copy.channels_last = memory_format == "channels_last"
        return copy.to(memory_format=kernels.TORCH_FORMATS[memory_format])

    pairs = [("fp32", "contiguous"), ("fp32", "channels_last")]
    trial = kernels.time_candidates(pairs, model, convert, simple_cnn_configs.get("cifar10"), batches, CPU, 100)
    assert set(trial["images_per_second"]) == set(pairs) and all(r > 0 for r in trial["images_per_second"].values())
    assert kernels.MIN_ROUNDS <= trial["rounds"] <= kernels.MAX_ROUNDS
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.channels_last
    assert model.conv.weight.is_contiguous() and model.conv.weight.grad is None


def conv_weights(run):
    state = load_tensors(list_checkpoints(run / "checkpoints")[0])["model"]
    return [w for w in state.values() if w.dim() == 4 and w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1]  # not
    # Standardize's (1, 3, 1, 1) statistics, whose strides fit both formats


def session(run):
    return json.loads((run / "meta.json").read_text())["sessions"][-1]


def is_channels_last(weights):
    return all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)


@pytest.mark.slow
def test_a_forced_format_is_what_the_run_trains_in_and_records(train_here, tmp_path):
    for memory_format in ("channels_last", "contiguous"):
        run = tmp_path / memory_format
        assert train_here(run, "--n_epochs=1", "--precision=fp32", f"--memory_format={memory_format}").returncode == 0
        assert (session(run)["memory_format"], session(run)["kernels_chosen_by"]) == (memory_format, "config")
        weights = conv_weights(run)
        assert weights and is_channels_last(weights) == (memory_format == "channels_last")
        assert all(w.is_contiguous() for w in weights) == (memory_format == "contiguous")
    assert train_here(tmp_path / "bad", "--memory_format=nhwc").returncode == 2


@pytest.mark.slow
def test_a_recorded_choice_is_reused_on_resume(train_here, tmp_path):
    """The first session's choice, whatever decided it, is the format of every later session: here a trial
    that picked channels_last is written into meta.json, and the resumed epoch trains in channels_last."""
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1", "--precision=fp32").returncode == 0
    assert (session(run)["memory_format"], session(run)["kernels_chosen_by"]) == ("contiguous", "rule")
    meta = json.loads((run / "meta.json").read_text())
    meta["sessions"][-1].update(memory_format="channels_last", kernels_chosen_by="trial")
    (run / "meta.json").write_text(json.dumps(meta))
    resumed = train_here(run, "--n_epochs=2", "--precision=fp32")
    assert resumed.returncode == 0, resumed.stderr
    assert (session(run)["memory_format"], session(run)["kernels_chosen_by"]) == ("channels_last", "recorded")
    assert is_channels_last(conv_weights(run))


@pytest.mark.slow
def test_a_trial_leaves_no_trace_and_its_choice_resumes_exactly(train, data_dir, tmp_path):
    """A run long enough for the trial, killed mid-epoch and resumed, ends bit for bit as an uninterrupted run
    told the chosen kernels outright: the trial changed nothing, and the resumed session kept its choice."""
    run = tmp_path / "trial"
    args = [TRIAL_EPOCHS, "--dropout=0.5", "--checkpoint_every_n_batches=4", "--precision=fp32"]
    kill_mid_epoch(TRAIN_SCRIPT, "cifar10", run, *TINY, *args, "--memory_format=auto", data_dir=data_dir)
    first = session(run)
    assert first["kernels_chosen_by"] == "trial"
    assert set(first["kernel_trial"]["images_per_second"]) == {"fp32 contiguous", "fp32 channels_last"}
    resumed = train(run, *args, "--memory_format=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert (session(run)["memory_format"], session(run)["kernels_chosen_by"]) == (first["memory_format"],
                                                                                  "recorded")
    told = tmp_path / "told"
    result = train(told, *args, f"--memory_format={first['memory_format']}")
    assert result.returncode == 0, result.stderr
    assert_identical(run, told)
