from pathlib import Path

import pytest

from llmemb_dist.config import Config, ConfigError, config_hash, key_help, load_config, split_argv, to_yaml

REPO = Path(__file__).resolve().parent.parent


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(REPO / "configs" / "default.yaml", ["root=s3://b/p", "scft.steps=7", "model.lora.r=4", "rat.eval.ks=[1, 2]"])
    assert isinstance(cfg, Config)
    assert cfg.root == "s3://b/p"
    assert cfg.scft.steps == 7 and cfg.model.lora.r == 4 and cfg.rat.eval.ks == [1, 2]
    assert cfg.dataset.name == "ml-100k"


def test_int_is_accepted_for_float_and_number_for_name():
    cfg = load_config(None, ["scft.lr=1", "scft.run=7"])
    assert cfg.scft.lr == 1.0 and isinstance(cfg.scft.lr, float)
    assert cfg.scft.run == "7"


@pytest.mark.parametrize(
    "override, key",
    [("scft.stepz=3", "scft.stepz"), ("nope=1", "nope"), ("model.lora.rank=2", "model.lora.rank")],
)
def test_unknown_key_is_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, key",
    [("scft.steps=many", "scft.steps"), ("scft.steps=true", "scft.steps"), ("model.pooling=max", "model.pooling"),
     ("rat.eval.ks=3", "rat.eval.ks"), ("dataset=3", "dataset")],
)
def test_wrong_type_is_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("scft:\n  batch: 3\n")
    with pytest.raises(ConfigError, match="'scft.batch'"):
        load_config(path)


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["=3"])


def test_argv_split_and_round_trip(tmp_path):
    path, overrides = split_argv(["configs/default.yaml", "a.b=1"])
    assert path == "configs/default.yaml" and overrides == ["a.b=1"]
    cfg = load_config(None, ["scft.steps=11"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    again = load_config(dumped)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["scft.steps=12"])) != config_hash(cfg)


def test_every_default_is_in_range():
    assert load_config(None) == Config()
    assert load_config(REPO / "configs" / "default.yaml").scft.zero_stage == 2


def test_safe_names_uris_and_empty_optionals_are_accepted():
    cfg = load_config(None, ["dataset.name=ml-100k-day2", "rat.embeddings=s3://bucket/other/embeddings/v1",
                             "adapt.embeddings=", "root=s3://my-bucket/prefix", "embed.version=20260101-0300"])
    assert cfg.rat.embeddings.startswith("s3://") and cfg.adapt.embeddings == ""


def test_storage_join_refuses_to_climb_out_of_its_base():
    from llmemb_dist import storage

    assert storage.join("s3://b/root", "rat", "run") == "s3://b/root/rat/run"
    with pytest.raises(storage.StorageError, match="would leave"):
        storage.join("s3://b/root", "datasets", "../../escaped")


def test_every_key_has_help_in_its_field_metadata():
    rows = key_help()
    assert len(rows) > 90
    missing = [key for key, _kind, _default, meaning in rows if not meaning.strip()]
    assert not missing, f"config keys without a help= in their field metadata: {missing}"
