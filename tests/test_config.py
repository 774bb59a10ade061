"""utils/config.py (validation, --set parsing) and main.main's handling of bad input: status 2, one 'error:' line."""
import json
import os

import pytest
import torch

from utils import config


# ---- config.validate -------------------------------------------------------------------------------------------

def test_defaults_fill_every_key_and_chapter_conf_validates():
    with open(os.path.join(os.path.dirname(__file__), "..", "utils", "conf.json")) as f:
        chapter = json.load(f)
    conf = config.validate(chapter)
    assert set(conf) == set(config.KEYS)
    for key, value in chapter.items():
        assert conf[key] == value
    # a newer key not in the chapter's file takes its documented default
    assert conf["sparsifier"] == "random" and conf["aggregation"] == "masked_mean" and conf["partition"] == "iid"


def test_ints_given_for_float_keys_become_floats():
    conf = config.validate({"prop": 1, "lr": 2, "lambda": 0})
    assert conf["prop"] == 1.0 and type(conf["prop"]) is float
    assert type(conf["lr"]) is float and type(conf["lambda"]) is float


def test_cifar10_is_an_alias_of_cifar():
    assert config.validate({"type": "cifar10"})["type"] == "cifar"


@pytest.mark.parametrize("overrides, words", [
    ({"colour": "red"}, ["colour"]),
    ({"prop": "abc"}, ["prop", "float"]),
    ({"k": 1.5}, ["'k'", "int"]),
    ({"k": True}, ["'k'", "int"]),
    ({"pretrained": 1}, ["pretrained", "bool"]),
    ({"prop": 1.5}, ["prop"]),
    ({"prop": -0.1}, ["prop"]),
    ({"prop": float("nan")}, ["prop"]),
    ({"k": 0}, ["'k'"]),
    ({"global_epochs": 0}, ["global_epochs", ">= 1"]),
    ({"no_models": 3, "k": 4}, ["'k'", "no_models"]),
    ({"lr": 0}, ["lr"]),
    ({"lr": -0.01}, ["lr"]),
    ({"batch_size": 0}, ["batch_size"]),
    ({"alpha": 0}, ["alpha"]),
    ({"momentum": 1.01}, ["momentum"]),
    ({"seed": -1}, ["seed"]),
    ({"type": "imagenet"}, ["type", "imagenet"]),
    ({"aggregation": "median"}, ["aggregation"]),
    ({"sparsifier": "sign"}, ["sparsifier"]),
])
def test_validate_rejects(overrides, words):
    with pytest.raises(config.ConfigError) as raised:
        config.validate(overrides)
    message = str(raised.value)
    for word in words:
        assert word in message


def test_range_boundaries_that_are_allowed():
    conf = config.validate({"prop": 0, "lambda": 0, "momentum": 1, "no_models": 3, "k": 3, "global_epochs": 1})
    assert conf["prop"] == 0.0 and conf["k"] == 3 and conf["global_epochs"] == 1
    assert config.validate({"prop": 1})["prop"] == 1.0


# ---- --set parsing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("prop=0.5", ("prop", 0.5)),
    ("k=3", ("k", 3)),
    ("error_feedback=true", ("error_feedback", True)),
    ("type=synthetic", ("type", "synthetic")),  # not JSON: stays a string
    ("data_dir=/tmp/x=y", ("data_dir", "/tmp/x=y")),  # only the first '=' splits
    ('type="mnist"', ("type", "mnist")),  # a JSON string
    (" lr =0.1", ("lr", 0.1)),
    ("seed=[1, 2]", ("seed", [1, 2])),
])
def test_parse_assignment(text, expected):
    key, value = config.parse_assignment(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["prop", "=0.5", "  =1"])
def test_parse_assignment_rejects(text):
    with pytest.raises(config.ConfigError):
        config.parse_assignment(text)


def test_load_reads_object_and_rejects_others(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"prop": 0.25, "type": "synthetic"}')
    assert config.load(str(good)) == {"prop": 0.25, "type": "synthetic"}
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(config.ConfigError):
        config.load(str(array))


# ---- main.main: bad input -> status 2, exactly one line "error: ..." on stderr ---------------------------------

def assert_one_error_line(status, err, *words):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("sets, words", [
    (["colour=red"], ["colour"]),
    (["prop=abc"], ["prop"]),
    (["k=1.5"], ["'k'"]),
    (["pretrained=1"], ["pretrained"]),
    (["prop=1.5"], ["prop"]),
    (["prop=-0.1"], ["prop"]),
    (["k=0"], ["'k'"]),
    (["k=5"], ["'k'"]),  # more than no_models=4
    (["lr=0"], ["lr"]),
    (["batch_size=0"], ["batch_size"]),
    (["type=imagenet"], ["type"]),
    (["model_name=resnet9000"], ["resnet9000"]),
    (["model_name=cnn", "pretrained=true"], ["pretrained"]),
    (["partition=shards", "shards_per_client=11"], ["shards_per_client"]),
    (["prop"], ["prop"]),  # --set without '='
])
def test_cli_bad_config(run_main, write_conf, tmp_path, sets, words):
    out = tmp_path / "run"
    argv = ["-c", write_conf()]
    for assignment in sets:
        argv += ["--set", assignment]
    status, _, err = run_main(*argv, "--out", out)
    assert_one_error_line(status, err, *words)
    assert not (out / "checkpoint.pt").exists()


def test_cli_missing_conf_file(run_main, tmp_path):
    missing = tmp_path / "nope.json"
    status, _, err = run_main("-c", missing, "--out", tmp_path / "run")
    assert_one_error_line(status, err, str(missing))


def test_cli_malformed_json(run_main, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"prop": 0.5,,}')
    status, _, err = run_main("-c", broken, "--out", tmp_path / "run")
    assert_one_error_line(status, err, "JSON")


def test_cli_no_conf_given(run_main, tmp_path):
    status, _, err = run_main("--out", tmp_path / "run")
    assert_one_error_line(status, err)


def test_cli_unknown_argument(run_main, write_conf, tmp_path):
    status, _, err = run_main("-c", write_conf(), "--out", tmp_path / "run", "--bogus")
    assert_one_error_line(status, err, "--bogus")


def test_cli_resume_with_nothing_to_resume(run_main, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_main("--out", empty, "--resume")
    assert_one_error_line(status, err, "nothing to resume")
    status, _, err = run_main("--resume")  # no --out at all
    assert_one_error_line(status, err, "nothing to resume")


def test_cli_cuda_asked_but_unavailable(run_main, write_conf, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    status, _, err = run_main("-c", write_conf(), "--set", "device=cuda", "--out", out)
    assert_one_error_line(status, err, "cuda")
    assert not (out / "checkpoint.pt").exists()


def test_cli_set_values_reach_the_resolved_config(run_main, write_conf, tmp_path):
    """--set values parse as JSON (numbers, booleans), bare strings stay strings; config.json shows them."""
    out = tmp_path / "run"
    status, _, _ = run_main("-c", write_conf(), "--set", "global_epochs=1", "--set", "prop=0.25",
                            "--set", "error_feedback=true", "--set", "sparsifier=topk", "--out", out)
    assert status == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["prop"] == 0.25 and saved["error_feedback"] is True and saved["sparsifier"] == "topk"
    assert saved["global_epochs"] == 1
