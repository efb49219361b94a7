import pytest
from omegaconf import OmegaConf

from core import config
from core.config import ConfigError, compose


@pytest.fixture
def configs(tmp_path, monkeypatch):
    (tmp_path / "stage").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "preset").mkdir()
    (tmp_path / "stage" / "base.yaml").write_text("train:\n  lr: 1.0e-4\n  steps: 10\ndata:\n  kind: synthetic\n  image_size: 64\nextra: {}\n")
    (tmp_path / "stage" / "fam.yaml").write_text("model:\n  width: 32\ntrain:\n  steps: 20\n")
    (tmp_path / "data" / "big.yaml").write_text("kind: imagefolder\nroot: /x\nimage_size: 256\n")
    (tmp_path / "preset" / "demo.yaml").write_text("stage:\n  train:\n    steps: 3\nfam:\n  model:\n    width: 8\nother:\n  nope: 1\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    return tmp_path


def test_layers_compose_in_order(configs):
    cfg = compose("stage", "fam", "demo", ["train.lr=0.5"])
    assert cfg.train.steps == 3 and cfg.model.width == 8 and cfg.train.lr == 0.5


def test_family_without_preset(configs):
    cfg = compose("stage", "fam")
    assert cfg.train.steps == 20 and cfg.train.lr == 1.0e-4


def test_unknown_key_names_nearest(configs):
    with pytest.raises(ConfigError, match="train.stpes.*did you mean 'train.steps'"):
        compose("stage", "fam", None, ["train.stpes=5"])


def test_unknown_key_in_preset_is_an_error(configs):
    (configs / "preset" / "bad.yaml").write_text("stage:\n  train:\n    lrr: 1\n")
    with pytest.raises(ConfigError, match="train.lrr.*preset/bad.yaml.*train.lr"):
        compose("stage", "fam", "bad")


def test_group_selection_then_override(configs):
    cfg = compose("stage", "fam", None, ["data.root=/y", "data=big"])
    assert cfg.data.kind == "imagefolder" and cfg.data.root == "/y"


def test_unknown_group_member_lists_choices(configs):
    with pytest.raises(ConfigError, match="no data config named 'huge'.*big"):
        compose("stage", None, None, ["data=huge"])


def test_open_mapping_accepts_new_keys(configs):
    assert compose("stage", None, None, ["extra.anything=3"]).extra.anything == 3


def test_open_mapping_stays_open_after_a_preset_fills_it(configs):
    (configs / "preset" / "opts.yaml").write_text("stage:\n  extra:\n    depth: 2\n  train:\n    steps: runs/${name}\n")
    cfg = compose("stage", None, "opts", ["extra.patch=2", "train.lr=0.1"])  # ${name} is set later: not resolved here
    assert cfg.extra.depth == 2 and cfg.extra.patch == 2 and OmegaConf.to_yaml(cfg).count("${name}") == 1


def test_open_mapping_stays_open_after_a_family_file_fills_it(configs):
    (configs / "stage" / "filled.yaml").write_text("extra:\n  depth: 2\n")
    (configs / "preset" / "more.yaml").write_text("filled:\n  extra:\n    width: 8\n")
    cfg = compose("stage", "filled", "more", ["extra.patch=2"])
    assert dict(cfg.extra) == {"depth": 2, "width": 8, "patch": 2}


def test_values_are_typed(configs):
    cfg = compose("stage", "fam", None, ["train.lr=2e-4", "model.width=[1,2]"])
    assert isinstance(cfg.train.lr, float) and list(cfg.model.width) == [1, 2]


def test_split_cli():
    pos, preset, over = config.split_cli(["vavae", "preset=demo", "a.b=1", "--flag"])
    assert pos == ["vavae", "--flag"] and preset == "demo" and over == ["a.b=1"]


def test_repo_presets_only_name_known_sections():
    """Every section of every shipped preset names a stage folder, a family file or a stage of a staged family file
    (fae_pixel)."""
    stages = {p.name for p in config.CONFIG_DIR.iterdir() if p.is_dir()}
    families = {p.stem for p in config.CONFIG_DIR.glob("*/*.yaml")}
    families |= {f"{p.stem}_{s}" for p in config.CONFIG_DIR.glob("*/*.yaml") for s in OmegaConf.load(p).get("stages") or {}}
    for preset in (config.CONFIG_DIR / "preset").glob("*.yaml"):
        doc = OmegaConf.load(preset) or {}
        for section in doc:
            assert section in stages | families, f"{preset.name}: section {section!r} matches no stage or family"


def test_a_staged_family_takes_its_stage_from_the_command_line_not_a_preset(tmp_path):
    """FAE's `stage=` picks a recipe under the presets and the command line; a preset section of that stage
    (fae_pixel) applies, one that picks the stage itself is refused."""
    preset = tmp_path / "p.yaml"
    preset.write_text("fae_pixel: {train: {steps: 7}}\nfae_feature: {train: {steps: 9}}\n")
    cfg = config.compose("tokenizer", "fae", str(preset), ["stage=pixel", "train.batch_size=3"])
    assert (cfg.stage, cfg.train.steps, cfg.train.batch_size, cfg.loss.disc_start) == ("pixel", 7, 3, 400000)
    preset.write_text("fae: {stage: pixel}\n")
    with pytest.raises(config.ConfigError, match=r"p.yaml \[fae\]: a staged family's stage is chosen by stage="):
        config.compose("tokenizer", "fae", str(preset))
