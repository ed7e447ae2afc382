"""Configs and the command line: typed overrides, the registry, validation, and the script's errors and --help."""
import json

import pytest

from configs.simple_cnn import CHOICES, simple_cnn_configs, validate
from src.cli import dispatch_with_overrides
from src.config import ConfigRegistry, apply_overrides, diff_keys, parse_value
from src.errors import UsageError
from conftest import TINY, TRAIN_SCRIPT, run_script

ROOT = simple_cnn_configs.root


@pytest.fixture
def registry():
    """A registry whose root has one key of every supported type, lists and dicts included."""
    reg = ConfigRegistry()
    reg.set_root({"name": "base", "count": 3, "rate": 0.5, "flag": False, "sizes": [1, 2], "opts": {"k": 1}})
    reg.derive("big", count=10, sizes=[4, 5, 6])
    return reg


# ---------------------------------------------------------------- 1. parsing values by the root's types


@pytest.mark.parametrize(("key", "text", "expected"), [
    ("count", "7", 7),
    ("count", "-1", -1),
    ("rate", "0.25", 0.25),
    ("rate", "1e-3", 1e-3),
    ("name", "hello world", "hello world"),
    ("name", "123", "123"),
    ("sizes", "[3, 4]", [3, 4]),
    ("sizes", "[]", []),
    ("opts", '{"a": 1, "b": [2]}', {"a": 1, "b": [2]}),
])
def test_parse_value_types(registry, key, text, expected):
    value = parse_value(key, text, registry.root)
    assert value == expected
    assert type(value) is type(expected)


def test_int_text_for_float_key_gives_float(registry):
    value = parse_value("rate", "1", registry.root)
    assert value == 1.0 and type(value) is float
    config = apply_overrides(registry.root, {"rate": "2"})
    assert config["rate"] == 2.0 and type(config["rate"]) is float


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("True", True), ("yes", True), ("YeS", True), ("1", True),
    ("false", False), ("FALSE", False), ("no", False), ("No", False), ("NO", False), ("0", False),
])
def test_parse_bool_words_any_case(registry, text, expected):
    value = parse_value("flag", text, registry.root)
    assert value is expected


@pytest.mark.parametrize(("key", "text", "type_word"), [
    ("count", "abc", "int"),
    ("count", "1.5", "int"),
    ("count", "", "int"),
    ("rate", "fast", "float"),
    ("flag", "maybe", "bool"),
    ("flag", "2", "bool"),
    ("sizes", "[1,", "list"),
    ("sizes", '{"a":1}', "list"),
    ("sizes", '"a"', "list"),
    ("opts", "[1]", "dict"),
    ("opts", "{bad", "dict"),
])
def test_parse_bad_value_names_key_and_type(registry, key, text, type_word):
    with pytest.raises(UsageError) as info:
        parse_value(key, text, registry.root)
    message = str(info.value)
    assert f"--{key}" in message
    assert f"expected {type_word}" in message


def test_bad_values_on_simple_cnn_root():
    with pytest.raises(UsageError, match=r"--n_filters.*expected int"):
        apply_overrides(ROOT, {"n_filters": "1.5"})
    with pytest.raises(UsageError, match=r"'maybe'.*--batch_norm.*expected bool"):
        apply_overrides(ROOT, {"batch_norm": "maybe"})


def test_apply_overrides_types_and_leaves_input_alone(registry):
    base = registry.get("big")
    before = json.loads(json.dumps(base))
    config = apply_overrides(base, {"count": "4", "flag": "Yes", "sizes": "[9]", "opts": '{"z": 0}', "name": "x"})
    assert config == {"name": "x", "count": 4, "rate": 0.5, "flag": True, "sizes": [9], "opts": {"z": 0}}
    assert base == before
    assert apply_overrides(base, {}) == base


def test_apply_overrides_on_simple_cnn_root():
    config = apply_overrides(ROOT, {"n_filters": "10", "lr": "0.1", "batch_norm": "false", "dataset": "cifar100"})
    assert config == {**ROOT, "n_filters": 10, "lr": 0.1, "batch_norm": False, "dataset": "cifar100"}


# ---------------------------------------------------------------- 2. unknown keys


def test_unknown_key_suggests_close_match():
    with pytest.raises(UsageError, match=r"did you mean --n_filters\?") as info:
        apply_overrides(ROOT, {"n_filter": "3"})
    assert "'n_filter'" in str(info.value)


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(UsageError) as info:
        apply_overrides(ROOT, {"zzzzqq": "3"})
    message = str(info.value)
    assert "'zzzzqq'" in message and "see --help" in message and "did you mean" not in message


# ---------------------------------------------------------------- 3. the registry


def test_derive_sets_changes_over_root(registry):
    assert registry.get("big") == {**registry.root, "count": 10, "sizes": [4, 5, 6]}
    registry.derive("rated", rate=2)  # an int is accepted for a float key, stored as float
    assert registry.get("rated")["rate"] == 2.0 and type(registry.get("rated")["rate"]) is float
    assert registry.names() == ["big", "rated", "root"]


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"count": "10"}, "--count"),
    ({"count": 1.5}, "--count"),
    ({"flag": 1}, "--flag"),
    ({"rate": "fast"}, "--rate"),
    ({"sizes": (1, 2)}, "--sizes"),
    ({"opts": []}, "--opts"),
])
def test_derive_checks_types(registry, changes, fragment):
    with pytest.raises(UsageError, match=fragment):
        registry.derive("broken", **changes)
    assert "broken" not in registry.names()


def test_derive_rejects_unknown_keys(registry):
    with pytest.raises(UsageError, match="unknown config key 'cout'"):
        registry.derive("broken", cout=4)
    assert "broken" not in registry.names()


def test_get_unknown_name_lists_available(registry):
    with pytest.raises(UsageError) as info:
        registry.get("small")
    message = str(info.value)
    assert "'small'" in message
    for name in ("big", "root"):
        assert name in message


def test_get_returns_a_copy(registry):
    config = registry.get("big")
    config["count"] = 99
    config["sizes"].append(7)
    config["opts"]["new"] = 2
    assert registry.get("big") == {**registry.root, "count": 10, "sizes": [4, 5, 6]}
    root = registry.root
    root["opts"]["k"] = 100
    root["name"] = "changed"
    assert registry.get("root") == {"name": "base", "count": 3, "rate": 0.5, "flag": False, "sizes": [1, 2],
                                    "opts": {"k": 1}}


def test_set_root_keeps_its_own_copy():
    original = {"sizes": [1]}
    reg = ConfigRegistry()
    reg.set_root(original)
    original["sizes"].append(2)
    assert reg.root == {"sizes": [1]}


def test_json_config_fills_missing_keys_from_root(registry, tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"count": 5, "rate": 1, "sizes": [8]}))
    config = registry.get(str(path))
    assert config == {**registry.root, "count": 5, "rate": 1.0, "sizes": [8]}
    assert type(config["rate"]) is float
    # the root's values, not those of a derived config
    assert config["opts"] == {"k": 1}


def test_json_config_on_simple_cnn(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"dataset": "cifar100", "batch_norm": False, "n_filters": 8}))
    config = simple_cnn_configs.get(str(path))
    assert config == {**ROOT, "dataset": "cifar100", "batch_norm": False, "n_filters": 8}


@pytest.mark.parametrize(("content", "fragments"), [
    ('{"count": 5, "cont": 1}', ["'cont'", "did you mean --count?"]),
    ('{"zzzzqq": 1}', ["'zzzzqq'", "see --help"]),
    ('{"count": "5"}', ["--count", "expected int"]),
    ('{"count": 5.5}', ["--count", "expected int"]),
    ('{"flag": 1}', ["--flag", "expected bool"]),
    ('{"sizes": {"a": 1}}', ["--sizes", "expected list"]),
    ('{"count": 5', ["not valid JSON"]),
    ("", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ('"just a string"', ["JSON object"]),
])
def test_bad_json_config(registry, tmp_path, content, fragments):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError) as info:
        registry.get(str(path))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


def test_missing_json_config(registry, tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(UsageError, match="does not exist") as info:
        registry.get(str(path))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- 4. the simple CNN configs


def test_named_configs_exist_with_their_dataset():
    assert {"root", "cifar10", "cifar100", "cifar100_coarse"} <= set(simple_cnn_configs.names())
    assert simple_cnn_configs.get("cifar10") == {**ROOT, "dataset": "cifar10"}
    assert simple_cnn_configs.get("cifar100") == {**ROOT, "dataset": "cifar100"}
    assert simple_cnn_configs.get("cifar100_coarse") == {**ROOT, "dataset": "cifar100", "label_mode": "coarse"}


@pytest.mark.parametrize("name", ["root", "cifar10", "cifar100", "cifar100_coarse"])
def test_named_configs_are_valid(name):
    assert validate(simple_cnn_configs.get(name)) == []


def test_tiny_settings_are_valid():
    config = apply_overrides(simple_cnn_configs.get("cifar10"), dict(w[2:].split("=", 1) for w in TINY))
    assert validate(config) == []


@pytest.mark.parametrize(("key", "value"), [
    ("dataset", "svhn"),
    ("label_mode", "medium"),
    ("lr_schedule", "step"),
    ("device", "tpu"),
    ("precision", "fp8"),
    ("n_layers", 0),
    ("n_layers", 6),
    ("n_filters", 0),
    ("dim_dense", 0),
    ("batch_size", 0),
    ("n_epochs", 0),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("valid_size", -1),
    ("valid_size", 50000),
    ("n_examples", 0),
    ("n_examples", -2),
    ("lr", -1.0),
    ("lr", float("nan")),
    ("momentum", -0.5),
    ("momentum", float("nan")),
    ("weight_decay", -1e-4),
    ("checkpoint_every_n_batches", -1),
    ("checkpoint_every_seconds", -1.0),
])
def test_validate_reports_bad_values(key, value):
    problems = validate({**simple_cnn_configs.get("cifar10"), key: value})
    assert len(problems) == 1, problems
    assert f"--{key}" in problems[0]


@pytest.mark.parametrize(("key", "value"), [
    ("n_layers", 1), ("n_layers", 5), ("dropout", 0.0), ("valid_size", 0), ("valid_size", 49999),
    ("n_examples", 1), ("n_examples", -1), ("lr", 0.0), ("checkpoint_every_seconds", 0.0),
    ("label_mode", "coarse"), ("lr_schedule", "linear"), ("lr_schedule", "constant"),
    ("device", "cpu"), ("precision", "bf16"), ("precision", "fp32"),
])
def test_validate_accepts_edge_values(key, value):
    assert validate({**simple_cnn_configs.get("cifar100"), key: value}) == []


def test_validate_reports_every_problem():
    problems = validate({**ROOT, "dataset": "svhn", "n_layers": 0, "lr": -1.0})
    assert len(problems) == 3
    assert all(p.startswith("--") for p in problems)


def test_choices_match_the_named_configs():
    assert set(CHOICES["dataset"]) == {"cifar10", "cifar100"}


# ---------------------------------------------------------------- 5. diff_keys


def test_diff_keys():
    assert diff_keys({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert diff_keys({}, {}) == []
    assert diff_keys({"b": 1, "a": 1, "c": [1]}, {"a": 2, "b": 1, "c": [1, 2]}) == ["a", "c"]
    assert diff_keys({"a": 1, "gone": 0}, {"a": 1, "new": 0}) == ["gone", "new"]
    assert diff_keys({"z": 1, "y": 1, "x": 1}, {"z": 2, "y": 2, "x": 2}) == ["x", "y", "z"]
    assert diff_keys(ROOT, {**ROOT, "n_epochs": 40, "lr": 0.1}) == ["lr", "n_epochs"]


# ---------------------------------------------------------------- the command line, in process (cheap)


def dispatch(argv, registry=simple_cnn_configs):
    """Run dispatch_with_overrides with `argv`; returns (exit code, configs passed to run)."""
    calls = []

    def run(config, save_path):
        calls.append((config, save_path))
        return 0

    with pytest.raises(SystemExit) as info:
        dispatch_with_overrides(run, registry, argv=argv)
    return info.value.code, calls


def test_dispatch_resolves_name_and_overrides():
    code, calls = dispatch(["cifar100", "out/run", "--n_filters=10", "--batch_norm=No", "--lr", "0.1"])
    assert code == 0
    assert calls == [({**ROOT, "dataset": "cifar100", "n_filters": 10, "batch_norm": False, "lr": 0.1}, "out/run")]


def test_dispatch_json_then_override(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"n_epochs": 3, "seed": 4}))
    code, calls = dispatch([str(path), "out", "--n_epochs=1"])
    assert code == 0
    assert calls == [({**ROOT, "n_epochs": 1, "seed": 4}, "out")]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["cifar10", "out", "--n_filter=3"], "did you mean --n_filters?"),
    (["cifar10", "out", "--n_filt=3"], "unknown config key 'n_filt'"),
    (["cifar10", "out", "--n_filt", "3"], "unknown config key 'n_filt'"),
    (["cifar10", "out", "--n_filters=x"], "expected int"),
    (["cifar9", "out"], "cifar100"),
    (["cifar10"], "save"),
])
def test_dispatch_usage_errors(capsys, argv, fragment):
    code, calls = dispatch(argv)
    assert code == 2
    assert calls == []
    err = capsys.readouterr().err
    assert fragment in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 6.-9. the real command line


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def option_help(help_text):
    """`--key` -> the help text after it (joined over wrapped lines), from the --help output."""
    entries, current = {}, None
    for line in help_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            option, *rest = stripped.split(None, 2)
            current = option
            entries[current] = " ".join(rest[1:])
        elif current and line.startswith(" " * 10) and stripped:
            entries[current] = (entries[current] + " " + stripped).strip()
        else:
            current = None
    return entries


def test_help_lists_every_key_with_default(data_dir):
    result = run_script(TRAIN_SCRIPT, "--help", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    entries = option_help(result.stdout)
    for key, value in ROOT.items():
        assert f"--{key}" in entries, f"--{key} missing from --help"
        assert f"default: {json.dumps(value)}" in entries[f"--{key}"], (key, entries[f"--{key}"])
    for name in ("cifar10", "cifar100"):
        assert name in result.stdout


@pytest.mark.parametrize(("args", "fragments"), [
    (["cifar10", "{save}", "--n_filter=3"], ["n_filter", "did you mean --n_filters?"]),
    (["cifar10", "{save}", "--n_filters=1.5"], ["--n_filters", "int"]),
    (["cifar10", "{save}", "--batch_norm=maybe"], ["--batch_norm", "bool"]),
    (["cifar7", "{save}"], ["cifar7", "cifar10", "cifar100"]),
    (["cifar10", "{save}", "--dataset=svhn"], ["--dataset", "svhn"]),
    (["cifar10"], ["required", "save"]),
    (["cifar10", "{save}", "--n_filt=3"], ["unknown config key 'n_filt'"]),
], ids=["unknown-key", "bad-int", "bad-bool", "unknown-config", "invalid-dataset", "missing-save-path",
        "abbreviation"])
def test_usage_errors_exit_2_with_one_line(data_dir, tmp_path, args, fragments):
    save = tmp_path / "run"
    result = run_script(TRAIN_SCRIPT, *[a.format(save=save) for a in args], data_dir=data_dir)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not save.exists()  # nothing started


def test_json_config_on_the_command_line(train, data_dir, tmp_path):
    """A .json config trains for real; its values land in config.json, the rest from the root."""
    path = tmp_path / "exp.json"
    from_json = {"seed": 7, "lr_schedule": "linear", "augment": False, "momentum": 0.5}
    tiny = dict(w[2:].split("=", 1) for w in TINY)
    path.write_text(json.dumps({**from_json, **{k: json.loads(v) for k, v in tiny.items()}}))

    result = train(tmp_path / "run", config=str(path))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == apply_overrides({**ROOT, **from_json}, tiny)
    assert saved["n_epochs"] == 2

    # --n_epochs=1 after the .json (which says 2; no TINY on this command line) wins over it
    result = run_script(TRAIN_SCRIPT, path, tmp_path / "run1", "--n_epochs=1", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run1" / "config.json").read_text())
    assert saved == apply_overrides({**ROOT, **from_json}, {**tiny, "n_epochs": "1"})
    status = json.loads((tmp_path / "run1" / "status.json").read_text())
    assert status["epochs_done"] == 1


def test_runs_from_another_working_directory(data_dir, tmp_path):
    result = run_script(TRAIN_SCRIPT.resolve(), "--help", data_dir=data_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--n_filters" in result.stdout
    # and gets as far as the config check from there
    result = run_script(TRAIN_SCRIPT.resolve(), "cifar10", tmp_path / "run", "--dataset=svhn", data_dir=data_dir,
                        cwd=tmp_path)
    assert result.returncode == 2 and stderr_lines(result) == ["error: --dataset must be one of cifar10, cifar100, "
                                                               "not 'svhn'"]
