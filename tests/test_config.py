"""Config: defaults = digits preset, YAML files, typed `--set` overrides, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from msl_kit.train.config import (
    CONFIG_DIR,
    Config,
    load_config,
    parse_override,
    save_config,
    valid_keys,
)
from msl_kit.train.validation import ConfigError


def test_defaults_equal_the_embedded_omniglot_preset():
    assert dataclasses.replace(load_config("omniglot_small"), description="") == load_config()


def test_every_shipped_config_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "digits" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.description, f"{name}.yaml should say what it is and where it comes from"


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "loss.beta=50",
            "train.lr=3e-5",
            "train.lr_steps=[1200, 2400]",
            "model.pretrained=null",
            "data.hflip=true",
            "seed=7",
        ],
    )
    assert cfg.loss.beta == 50.0 and isinstance(cfg.loss.beta, float)
    assert cfg.train.lr == 3e-5
    assert cfg.train.lr_steps == [1200, 2400]
    assert cfg.model.pretrained is None and cfg.data.hflip is True and cfg.seed == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iterations=1.5", "train.iterations expects int"),
        ("train.iterations=abc", "expects int"),
        ("loss.beta=[1]", "expects float"),
        ("data.hflip=3", "expects bool"),
    ],
)
def test_bad_types_say_what_is_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.bta=3"])
    assert "loss.beta" in str(e.value) and "train.iterations" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(None, ["nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("loss.beta")


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  iterationz: 3\n")
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(path)


def test_presets_set_the_four_numbers_and_later_keys_win():
    cfg = load_config(None, ["loss.preset=paper"])
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.lam, cfg.loss.margin) == (2.0, 50.0, 1.0, 0.1)
    cfg = load_config(None, ["loss.preset=paper", "loss.beta=60"])
    assert cfg.loss.beta == 60.0
    with pytest.raises(ConfigError, match="released"):
        load_config(None, ["loss.preset=mine"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["train.batch_size=43"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["eval.split=val"])
    with pytest.raises(ConfigError, match="amp"):
        load_config(None, ["train.amp=fp8"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(
        None, ["loss.preset=paper", "train.lr_steps=[5]", "data.crop_scale=[0.5, 1.0]"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["preset"] == "paper"


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_valid_keys_cover_the_contract():
    keys = set(valid_keys(Config()))
    contract = {
        "data.name",
        "data.root",
        "model.backbone",
        "model.embedding_dim",
        "loss.alpha",
        "loss.beta",
        "loss.lam",
        "loss.margin",
        "train.iterations",
        "train.batch_size",
        "train.samples_per_class",
        "train.lr",
        "train.eval_every",
        "train.checkpoint_every",
        "seed",
        "device",
    }
    assert contract <= keys
    assert all(
        dataclasses.is_dataclass(getattr(Config(), k.split(".")[0])) for k in keys if "." in k
    )


def test_cub_recipe_is_the_released_one():
    cfg = load_config("cub200_bninception_512")
    assert (cfg.model.backbone, cfg.model.embedding_dim, cfg.model.freeze_bn) == (
        "bninception",
        512,
        True,
    )
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.lam, cfg.loss.margin) == (2.0, 40.0, 0.5, 0.1)
    t = cfg.train
    assert (t.batch_size, t.samples_per_class, t.lr, t.weight_decay) == (80, 5, 3e-5, 5e-4)
    assert (t.iterations, t.lr_steps, t.lr_gamma, t.warmup) == (3000, [1200, 2400], 0.1, 0)
    assert cfg.data.name == "cub200" and cfg.data.crop_scale is None  # the backbone's (0.16, 1)
