"""Job configs read from YAML and --set: validation names the field, values parse as YAML, local
paths become absolute, every shipped preset validates."""

from __future__ import annotations

import json

import pytest

from support import REPO
from pipeline import featurize, pretrain
from pipeline.config import (
    ConfigError,
    EmbedConfig,
    FeaturizeConfig,
    FinetuneJobConfig,
    PretrainJobConfig,
    flatten,
    load_config,
    public_dict,
)
from pipeline.config.sweep import TuneJobConfig

TINY = str(REPO / "configs/pretrain/local-tiny.yaml")


def test_invalid_config_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input: {uri: /data}\noutput: /out\nshard_size: 0\naudio: {long_audio: slice}\n")
    with pytest.raises(ConfigError) as error:
        load_config(FeaturizeConfig, path)
    message = str(error.value)
    assert "shard_size" in message and "audio.long_audio" in message
    with pytest.raises(ConfigError, match="input"):
        load_config(FeaturizeConfig, None, ["output=/out"])
    with pytest.raises(ConfigError, match="exactly one of input.uri"):
        load_config(FeaturizeConfig, None, ["output=/out", "input.uri=/a", "input.manifest=/b.csv"])
    with pytest.raises(ConfigError, match="shard_sise"):
        load_config(FeaturizeConfig, None, ["output=/out", "input.uri=/a", "shard_sise=3"])  # typo


def test_overrides_parse_yaml_values_and_secrets_stay_hidden():
    config = load_config(FeaturizeConfig, None, [
        "input.uri=s3://b/p", "output=s3://b/out", "shard_size=12", "audio.max_seconds=2.5",
        "storage.access_key_id=AKIA-TEST", "storage.secret_access_key=very-secret",
    ])
    assert config.shard_size == 12 and config.audio.max_seconds == 2.5
    for text in (repr(config), json.dumps(public_dict(config)), json.dumps(flatten(public_dict(config)))):
        assert "very-secret" not in text and "AKIA-TEST" not in text
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}
    with pytest.raises(ConfigError, match="key=value"):
        load_config(FeaturizeConfig, None, ["shard_size"])
    with pytest.raises(ConfigError, match="together"):
        load_config(FeaturizeConfig, None, ["input.uri=/a", "output=/b", "storage.access_key_id=x"])


def test_local_paths_are_made_absolute_where_the_config_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray workers and Tune trials run elsewhere: relative paths must not reach them
    config = load_config(FinetuneJobConfig, None, [
        "name=n", "task=esc50", "storage_path=runs", "data_root=~/esc50", "features=s3://bucket/features"])
    assert config.storage_path == (tmp_path / "runs").as_posix() and config.model.checkpoint == ""
    assert config.data_root.startswith("/") and config.data_root.endswith("/esc50") and "~" not in config.data_root
    assert config.features == "s3://bucket/features"


@pytest.mark.parametrize("folder,model", [("featurize", FeaturizeConfig), ("pretrain", PretrainJobConfig),
                                          ("embed", EmbedConfig), ("finetune", FinetuneJobConfig),
                                          ("tune", TuneJobConfig)])
def test_shipped_presets_validate(folder, model):

    presets = sorted(REPO.joinpath("configs", folder).glob("*.yaml"))
    assert presets
    for preset in presets:
        load_config(model, preset)


def test_paper_recipe_preset():
    config = load_config(PretrainJobConfig, "configs/pretrain/base.yaml")
    assert config.train.global_batch_size == 64 and config.optim.lr == 1e-4 and config.optim.weight_decay == 5e-8
    assert config.optim.betas == (0.95, 0.999) and config.optim.warmup_steps == 1000 and config.masking.mask_patches == 400
    with pytest.raises(ConfigError, match="exactly one of mask_patches and mask_ratio"):
        load_config(PretrainJobConfig, "configs/pretrain/base.yaml", ["masking.mask_ratio=0.5", "masking.mask_patches=300"])
    ratio = load_config(PretrainJobConfig, "configs/pretrain/base.yaml", ["masking={mask_ratio: 0.6}"])
    assert ratio.masking.mask_patches is None and ratio.masking.mask_ratio == 0.6


def test_elastic_scaling_and_a_global_batch_that_holds_on_every_world_size():
    from pipeline.pretrain import accumulation_steps

    preset = TINY  # batch_size 8
    config = load_config(PretrainJobConfig, preset, ["scaling.num_workers=[1, 4]", "scaling.resize_interval_s=5",
                                                     "train.global_batch_size=96"])
    assert config.scaling.elastic and config.scaling.worker_range == (1, 4)
    assert config.scaling.ray_scaling() == {"num_workers": (1, 4), "use_gpu": False, "resources_per_worker": {"CPU": 1},
                                            "elastic_resize_monitor_interval_s": 5.0}
    assert [accumulation_steps(config, size) for size in (1, 2, 3, 4)] == [12, 6, 4, 3]
    derived = load_config(PretrainJobConfig, preset, ["scaling.num_workers=[1, 2]", "train.grad_accum=2"])
    assert derived.train.global_batch_size == 32 and "global_batch_size" not in derived.train.model_fields_set
    assert [accumulation_steps(derived, size) for size in (1, 2)] == [4, 2]
    fixed = load_config(PretrainJobConfig, preset, ["scaling.num_workers=2", "train.grad_accum=3"])
    assert fixed.scaling.ray_scaling()["num_workers"] == 2 and fixed.train.global_batch_size == 48
    assert accumulation_steps(fixed, 2) == 3
    local = load_config(PretrainJobConfig, preset, ["scaling.num_workers=0", "train.global_batch_size=16"])
    assert accumulation_steps(local, 1) == 2
    for bad, field in ((["scaling.num_workers=[2, 1]"], "1 <= min <= max"), (["scaling.num_workers=[0, 2]"], "1 <= min"),
                       (["scaling.num_workers=[2, 3]"], r"train.global_batch_size: 24 \(batch_size x most workers x "
                        r"grad_accum\) is not a whole number of micro-batches of train.batch_size 8 on 2 workers .* "
                        r"multiple of 48"),
                       (["train.global_batch_size=16", "train.grad_accum=3"], "disagree"),
                       (["scaling.num_workers=[1, 2, 3]"], "scaling.num_workers")):
        with pytest.raises(ConfigError, match=field):
            load_config(PretrainJobConfig, preset, bad)
    with pytest.raises(ConfigError, match="scaling.num_workers"):  # fine-tuning keeps a fixed number
        load_config(FinetuneJobConfig, "configs/finetune/esc50.yaml", ["scaling.num_workers=[1, 2]"])


def test_featurize_cli_rejects_invalid_config_before_any_work(capsys):
    assert featurize.main(["--set", "input.uri=/nowhere", "--set", "output=/out", "--set", "num_workers=-1"]) == 2
    assert "num_workers" in capsys.readouterr().err


def test_invalid_config_fails_before_ray_with_the_field_named(capsys):
    with pytest.raises(ConfigError, match="masking.mask_patches|mask_patches"):
        load_config(PretrainJobConfig, TINY, ["masking.mask_patches=500"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(PretrainJobConfig, TINY, ["train.batch_size=0"])
    assert pretrain.main(["--config", TINY, "--set", "model.target_length=300"]) == 2
    assert "target_length" in capsys.readouterr().err
