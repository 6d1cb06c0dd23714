"""Config: defaults = digits preset, YAML files, typed `--set` overrides, clear errors; each
component's own section; old flat keys; alias bombs and size bounds."""

from __future__ import annotations

import dataclasses
import time
import warnings

import pytest
import yaml

from msl_kit.losses import MSParams
from msl_kit.train.config import (
    CONFIG_DIR,
    Config,
    config_text,
    from_dict,
    load_config,
    parse_override,
    save_config,
    valid_keys,
)
from msl_kit.train.old_keys import ConfigNote
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
            "loss.ms.beta=50",
            "train.lr=3e-5",
            "train.lr_steps=[1200, 2400]",
            "model.pretrained=null",
            "data.hflip=true",
            "seed=7",
        ],
    )
    assert cfg.loss.params.beta == 50.0 and isinstance(cfg.loss.params.beta, float)
    assert cfg.train.lr == 3e-5
    assert cfg.train.lr_steps == [1200, 2400]
    assert cfg.model.pretrained is None and cfg.data.hflip is True and cfg.seed == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iterations=1.5", "train.iterations expects int"),
        ("train.iterations=abc", "expects int"),
        ("loss.ms.beta=[1]", "loss.ms.beta expects float"),
        ("data.hflip=3", "expects bool"),
    ],
)
def test_bad_types_say_what_is_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.bta=3"])
    assert "loss.ms.beta" in str(e.value) and "train.iterations" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(None, ["nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("loss.beta")


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.ms.gamma=1", "'loss.ms.gamma': loss.ms takes alpha, beta, lam, margin"),
        ("loss.nope.alpha=1", "no loss is named nope"),
        ("model.convnet.image_size=9", "model.convnet takes in_channels, input_size"),
        ("model.bninception.width=9", "unknown config key 'model.bninception.width'"),
    ],
)
def test_a_component_section_takes_only_what_the_component_declares(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override, *(["model.backbone=bninception"] * ("bninc" in override))])
    assert "\n" not in str(err.value)


def test_switching_the_loss_never_carries_another_losss_numbers():
    """The done-when of issue 25: the MS recipe's alpha 2 stays MS's; Proxy-Anchor gets 32."""
    for recipe in ("cub200_bninception_512", "digits", None):
        cfg = load_config(recipe, ["loss.name=proxy_anchor"])
        assert (cfg.loss.params.alpha, cfg.loss.params.margin) == (32.0, 0.1), recipe
        assert cfg == load_config(recipe, ["loss.name=proxy_anchor", "loss.proxy_anchor.alpha=32"])
    cfg = load_config(None, ["loss.proxy_anchor.alpha=16", "loss.name=proxy_anchor"])
    assert cfg.loss.params.alpha == 16.0, "a key the user set wins over the loss's default"
    ms = load_config(None, ["loss.proxy_anchor.alpha=16"])  # a section of another loss: unused
    assert ms.loss.params == MSParams() and "proxy_anchor" not in config_text(ms)


def test_old_flat_keys_load_with_a_note_mapped_to_their_component(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        "model: {backbone: convnet, image_size: 12, in_channels: 3}\n"
        "loss: {name: ms, preset: paper, beta: 60}\n"
    )
    with pytest.warns(ConfigNote) as notes:
        cfg = load_config(old, ["loss.name=proxy_anchor"])
    lines = [str(n.message) for n in notes]
    assert any(line.startswith("loss.beta is written loss.ms.beta now") for line in lines)
    assert any("model.image_size is written model.convnet.input_size" in line for line in lines)
    # written for MS beside name: ms, so they never reach Proxy-Anchor
    assert cfg.loss.params.alpha == 32.0
    assert (cfg.model.params.input_size, cfg.model.params.in_channels) == (12, 3)
    with pytest.warns(ConfigNote):
        ms = load_config(old)
    assert ms.loss.params == MSParams(beta=60.0, lam=1.0)
    with pytest.warns(ConfigNote):  # a --set in the old form names the loss in effect
        assert load_config(None, ["loss.alpha=3"]).loss.params.alpha == 3.0


def test_a_stored_old_config_loads_silently_and_round_trips(tmp_path):
    """A run folder's config.yaml and a checkpoint's config from before the sections."""
    old = {
        "model": {"backbone": "convnet", "image_size": 28, "resize_size": 0, "in_channels": 1,
                  "width": 64, "global_pool": None, "input_size": 0, "embedding_dim": 64},
        "loss": {"name": "ms", "preset": None, "alpha": 2.0, "beta": 40.0, "lam": 0.5,
                 "margin": 0.1, "mining": None, "xbm_size": 0},
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = from_dict(old)
    assert cfg == load_config()
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert config_text(load_config(tmp_path / "config.yaml", stored=True)) == text
    assert yaml.safe_load(text)["loss"]["ms"] == {"alpha": 2.0, "beta": 40.0, "lam": 0.5,
                                                  "margin": 0.1}  # fmt: skip


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  iterationz: 3\n")
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(path)


def test_presets_set_the_four_numbers_and_later_keys_win():
    cfg = load_config(None, ["loss.ms.preset=paper"])
    assert cfg.loss.params == MSParams(2.0, 50.0, 1.0, 0.1) == MSParams.preset("paper")
    cfg = load_config(None, ["loss.ms.beta=60", "loss.ms.preset=paper"])
    assert cfg.loss.params.beta == 60.0 and cfg.loss.params.lam == 1.0
    with pytest.raises(ConfigError, match="released"):
        load_config(None, ["loss.ms.preset=mine"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["train.batch_size=43"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["eval.split=val"])
    with pytest.raises(ConfigError, match="amp"):
        load_config(None, ["train.amp=fp8"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(
        None, ["loss.ms.preset=paper", "train.lr_steps=[5]", "data.crop_scale=[0.5, 1.0]"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["ms"]["beta"] == 50.0


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


BOMB = "[" + ", ".join(
    ["&a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
) + "]"  # fmt: skip


def test_yaml_alias_bombs_are_refused_fast_in_one_line(tmp_path):
    """Issue 24.20: 9 levels of 9 aliases (~400 bytes) took 4.7 GB and a MemoryError."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"description: {BOMB}\n")
    for args in ((None, [f"description={BOMB}"]), (path, [])):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match="expands to more than 10000 values") as err:
            load_config(*args)
        assert time.perf_counter() - start < 1 and len(str(err.value)) < 400
    shared = tmp_path / "anchors.yaml"  # a few aliases are fine
    shared.write_text("train: {lr_steps: &s [5, 9]}\neval: {ks: *s}\n")
    assert load_config(shared).eval.ks == [5, 9]


def test_no_message_formats_a_huge_value_whole():
    huge = list(range(10**6))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(values={"description": huge})
    assert time.perf_counter() - start < 1 and len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "model.input_size=100000",  # the case, in the old key
        "model.timm.input_size=100000",
        "model.timm.resize_size=100000",
        "model.convnet.input_size=100000",
        "model.embedding_dim=100000",
        "train.batch_size=1000000",
        "eval.batch_size=1000000",
        "data.workers=100000",
        "train.threads=100000",
        "loss.xbm_size=100000000",
    ],
)
def test_every_size_key_has_an_upper_bound_checked_at_load(override):
    """Issue 24.19: `--set model.input_size=100000` with a timm backbone passed the checks
    and ran into the OOM killer."""
    timm = "timm" in override or override.startswith("model.input_size")
    extra = ["model.backbone=timm:resnet18"] if timm else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigNote)
        with pytest.raises(ConfigError, match="is not allowed: use .*<= ") as err:
            load_config(None, [*extra, override])
    key = override.split("=")[0].replace("model.input_size", "model.timm.input_size")
    assert str(err.value).startswith(key)


def test_valid_keys_cover_the_contract():
    keys = set(valid_keys(Config()))
    contract = {
        "data.name",
        "data.root",
        "model.backbone",
        "model.embedding_dim",
        "loss.ms.alpha",
        "loss.ms.beta",
        "loss.ms.lam",
        "loss.ms.margin",
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
    assert cfg.loss.params == MSParams(2.0, 40.0, 0.5, 0.1)
    t = cfg.train
    assert (t.batch_size, t.samples_per_class, t.lr, t.weight_decay) == (80, 5, 3e-5, 5e-4)
    assert (t.iterations, t.lr_steps, t.lr_gamma, t.warmup) == (3000, [1200, 2400], 0.1, 0)
    assert cfg.data.name == "cub200" and cfg.data.crop_scale is None  # the backbone's (0.16, 1)


def test_the_cli_prints_each_old_key_note_as_one_line(capsys):
    from msl_kit import cli

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        rc = cli.main(["train", "--set", "loss.beta=50", "--set", "train.batch_size=43"])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and lines[0] == (
        "note: loss.beta is written loss.ms.beta now (the parameter of the component it was "
        "written for); the old key still loads"
    )
    assert lines[1].startswith("error: train.batch_size = 43") and len(lines) == 2
