"""The config command line and the one way to change configs by dotted field name. No services needed."""

from __future__ import annotations

import importlib
import json

import pytest
import ray
import yaml
from pydantic import BaseModel

from support import REPO
from pipeline.config import (
    ConfigError, EmbedConfig, FeaturizeConfig, FinetuneJobConfig, PretrainJobConfig, load_config, public_dict,
)
from pipeline.runtime.launch import run_command
from pipeline.config.fields import _leaf_types, is_test_only, _section_model, field_at, set_fields, typed_value
from pipeline.config.sweep import TuneJobConfig, with_values
from ssamba import EMBED_DIMS, NORM_PRESETS, NORMS, EncoderConfig

LOCAL_TINY = str(REPO / "configs/pretrain/local-tiny.yaml")
ENTRY_POINTS = {"featurize": FeaturizeConfig, "pretrain": PretrainJobConfig, "finetune": FinetuneJobConfig,
                "embed": EmbedConfig, "tune": TuneJobConfig}


def leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every plain field of a schema by dotted name (sections expanded), as the help should list them
    (test-only switches left out)."""
    paths = []
    for name, field in model.model_fields.items():
        if is_test_only(field):
            continue
        section = _section_model(field.annotation)
        paths.extend(leaf_paths(section, f"{prefix}{name}.") if section else [prefix + name])
    return paths


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_lists_every_field_of_the_job(module, capsys):
    entry = importlib.import_module(f"pipeline.{module}")
    with pytest.raises(SystemExit) as done:
        entry.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--print-config" in text and "--set KEY=VALUE" in text
    paths = leaf_paths(ENTRY_POINTS[module])
    assert len(paths) > 10
    for path in paths:
        assert f"\n  {path}: " in text, path
    assert "testing." not in text  # fault injection is for the tests, not in the users' help


def test_help_shows_type_default_and_description(capsys):
    from pipeline import pretrain

    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    text = capsys.readouterr().out
    assert "  train.max_steps: int (≥ 1), required\n      optimizer steps in all" in text
    assert "  train.batch_size: int (≥ 1), default 64\n      per worker and micro-step" in text
    assert "  model.size: tiny|small|base, default tiny\n" in text
    assert "  masking.mask_ratio: float or null, default null\n      fraction of the patches" in text
    assert "  validation.*  section (optional)" in text
    # Every field of every job has a description.
    for model in ENTRY_POINTS.values():
        missing = [path for path in leaf_paths(model) if not field_at(model, path).description]
        assert not missing, f"{model.__name__}: {missing}"


def test_help_of_a_sweep_lists_the_search_space_entries(capsys):
    from pipeline import tune

    with pytest.raises(SystemExit):
        tune.main(["--help"])
    text = capsys.readouterr().out
    assert "  search.space: mapping str → Dimension" in text and "  search.space.<key>.grid: " in text
    assert "  pretrain.train.max_steps: int (≥ 1), required" in text


def test_print_config_prints_the_resolved_config_without_secrets_or_ray(capsys):
    from pipeline import pretrain

    if ray.is_initialized():  # an earlier test in this process started Ray: nothing to observe here
        pytest.skip("Ray already runs in this process")
    overrides = ["target_length=128", "storage.access_key_id=AKIA-TEST", "storage.secret_access_key=very-secret"]
    code = pretrain.main(["--config", LOCAL_TINY, *[f"--set={o}" for o in overrides], "--print-config"])
    out = capsys.readouterr().out
    assert code == 0 and not ray.is_initialized()
    assert "very-secret" not in out and "AKIA-TEST" not in out
    printed = yaml.safe_load(out)
    resolved = load_config(PretrainJobConfig, LOCAL_TINY, overrides)
    assert printed == yaml.safe_load(yaml.safe_dump(public_dict(resolved)))
    assert printed["model"]["target_length"] == printed["data"]["target_length"] == 128
    assert printed["optim"]["plateau_factor"] == 0.5  # defaults are filled in
    assert printed["storage_path"].startswith("/")  # as the job would see it: absolute


def test_print_config_never_runs_the_job(capsys):
    def job(config, args):
        raise AssertionError("the job must not run")

    assert run_command("d", FeaturizeConfig, job, ["--set", "input.uri=/a", "--set", "output=/b", "--print-config"]) == 0
    assert "shard_size: 256" in capsys.readouterr().out
    assert run_command("d", FeaturizeConfig, job, ["--set", "output=/b", "--print-config"]) == 2  # still validated
    assert "input" in capsys.readouterr().err


def test_set_keeps_text_for_string_fields():
    config = load_config(PretrainJobConfig, LOCAL_TINY, ["name=20261128", "tracking.experiment=2026-11-28",
                                                        "storage.region=true"])
    assert config.name == "20261128" and config.tracking.experiment == "2026-11-28" and config.storage.region == "true"
    assert typed_value(PretrainJobConfig, "tracking.tracking_uri", "null") is None  # optional: null is null
    assert typed_value(PretrainJobConfig, "storage_path", "") == ""  # required text: empty stays text
    assert typed_value(FinetuneJobConfig, "folds", "[1, 2]") == [1, 2]
    assert typed_value(PretrainJobConfig, "masking", "{mask_ratio: 0.6}") == {"mask_ratio": 0.6}
    assert typed_value(PretrainJobConfig, "no.such.field", "12") == 12  # unknown: plain YAML, validation names it


def test_set_takes_exponent_numbers_for_numeric_fields():
    config = load_config(PretrainJobConfig, LOCAL_TINY, ["train.max_steps=1e5", "optim.lr=3e-4", "scaling.num_workers=2e0"])
    assert config.train.max_steps == 100_000 and isinstance(config.train.max_steps, int)
    assert config.optim.lr == pytest.approx(3e-4) and config.scaling.num_workers == 2
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*fractional part"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*integer"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train\.max_stepz: no such field"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="'name' is not a config section"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["name.x=3"])


def test_one_target_length_drives_data_validation_and_model():
    config = load_config(PretrainJobConfig, LOCAL_TINY, ["target_length=512"])
    assert config.data.target_length == config.validation.target_length == config.model.target_length == 512
    assert config.model.encoder_config().grid.target_length == 512
    defaults = load_config(PretrainJobConfig, None, ["name=n", "storage_path=/c", "data.features=/f", "train.max_steps=1"])
    assert defaults.target_length == defaults.data.target_length == defaults.model.target_length == 1024
    # Set on purpose in every section (the way configs used to say it): kept.
    explicit = load_config(PretrainJobConfig, LOCAL_TINY, ["data.target_length=128", "validation.target_length=128",
                                                          "model.target_length=128"])
    assert explicit.data.target_length == explicit.model.target_length == 128
    with pytest.raises(ConfigError, match=r"data.target_length \(256\) must equal model.target_length \(128\)"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["model.target_length=128"])
    # A sweep trial that changes the job's target_length changes the sections' too.
    trial = with_values(load_config(PretrainJobConfig, LOCAL_TINY), {"target_length": 128})
    assert trial.data.target_length == trial.validation.target_length == trial.model.target_length == 128


def test_set_fields_copies_and_creates_sections():
    base = {"optim": {"lr": 1.0}, "validation": None, "name": "n"}
    changed = set_fields(base, {"optim.lr": 0.5, "validation.features": "/f", "train.seed": 3, "masking": {"a": 1}})
    assert changed == {"optim": {"lr": 0.5}, "validation": {"features": "/f"}, "name": "n", "train": {"seed": 3},
                       "masking": {"a": 1}}
    assert base == {"optim": {"lr": 1.0}, "validation": None, "name": "n"}  # untouched
    with pytest.raises(ValueError, match="'name' is not a config section"):
        set_fields(base, {"name.x": 1})
    with pytest.raises(ValueError, match="empty field name"):
        set_fields(base, {"optim..lr": 1})


def test_sweep_changes_to_a_base_config_go_through_the_same_paths(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "s", "sweep": "mask", "storage_path": str(tmp_path),
        "pretrain": {"base": LOCAL_TINY, "train": {"max_steps": 7}, "target_length": 128, "masking": {"mask_patches": 20}},
        "probe": {"name": "p", "storage_path": str(tmp_path), "task": "esc50", "data_root": str(tmp_path),
                  "features": str(tmp_path)},
        "search": {"space": {"optim.lr": {"grid": [0.1, 0.2]}}},
    }))
    config = load_config(TuneJobConfig, sweep, ["pretrain.optim.warmup_steps=1e1"])
    assert config.pretrain.train.max_steps == 7 and config.pretrain.train.batch_size == 8  # changed / kept
    assert config.pretrain.model.embed_dim == 64 and config.pretrain.model.target_length == 128
    assert config.pretrain.masking.mask_patches == 20 and config.pretrain.masking.validation_mask_patches == 96
    assert config.pretrain.optim.warmup_steps == 10


def test_job_schemas_take_their_choices_and_rules_from_the_model_library():
    model = PretrainJobConfig.model_fields["model"].annotation
    assert _leaf_types(model.model_fields["size"].annotation) == {str}
    assert set(model.model_fields["size"].annotation.__args__) == set(EMBED_DIMS)
    assert set(model.model_fields["norm"].annotation.__args__) == set(NORMS)
    examples = PretrainJobConfig.model_fields["data"].annotation
    assert set(examples.model_fields["norm"].annotation.__args__) == set(NORM_PRESETS)
    assert set(FinetuneJobConfig.model_fields["norm"].annotation.__args__) == set(NORM_PRESETS)
    # The encoder is the library's, a custom width included.
    config = load_config(PretrainJobConfig, LOCAL_TINY)
    assert config.model.encoder_config() == EncoderConfig.from_size(
        "tiny", embed_dim=64, depth=4, drop_path_rate=0.0, grid=config.model.encoder_config().grid)
    # The library's rules reject what it cannot build, before any Ray work, naming the section.
    with pytest.raises(ConfigError, match=r"model: flip_pairs topology needs an even depth"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["model.depth=5"])
    with pytest.raises(ConfigError, match=r"masking.mask_patches: cannot mask 128 of 128 patches"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["masking.mask_patches=128"])
    with pytest.raises(ConfigError, match=r"masking: .*mask_ratio must be in \(0, 1\)"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["masking={mask_ratio: 1.5}"])
    with pytest.raises(ConfigError, match=r"masking: .*mask_patches must be at least 1"):
        load_config(PretrainJobConfig, LOCAL_TINY, ["masking.mask_patches=0"])
    ratio = load_config(PretrainJobConfig, LOCAL_TINY, ["masking={mask_ratio: 0.5}"])
    assert ratio.masking.pretrain_config().num_masked(128) == 64


def test_secrets_and_uri_credentials_are_never_echoed_or_tracked():
    """A secret is taken as written (never parsed as YAML, so ``*`` and ``: `` are fine) and appears in no
    output; user-info inside URIs is dropped from what is printed and tracked."""
    import subprocess
    import sys

    secret = "*abc: def"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain", "--config", LOCAL_TINY, "--set", "storage.access_key_id=AKIA-ID",
         "--set", f"storage.secret_access_key={secret}", "--set", "tracking.tracking_uri=http://bob:hunter2@mlflow:5000",
         "--set", "storage.endpoint_url=http://key:pass@store:9000", "--print-config"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for leaked in (secret, "abc", "AKIA-ID", "hunter2", "bob:", "pass@"):
        assert leaked not in done.stdout + done.stderr
    assert "tracking_uri: http://mlflow:5000" in done.stdout and "endpoint_url: http://store:9000" in done.stdout

    config = load_config(PretrainJobConfig, LOCAL_TINY, ["storage.access_key_id=AKIA-ID",
                                                        f"storage.secret_access_key={secret}"])
    assert config.storage.secret_access_key.get_secret_value() == secret  # the store still gets it
    tracked = json.dumps(public_dict(load_config(PretrainJobConfig, LOCAL_TINY, [
        "tracking.tracking_uri=https://bob:hunter2@mlflow:5000/x?y=1"])))
    assert "hunter2" not in tracked and "https://mlflow:5000/x?y=1" in tracked
    assert load_config(PretrainJobConfig, LOCAL_TINY, ["tracking.experiment=exp: one"]).tracking.experiment == "exp: one"


def test_fine_tuning_refuses_local_mode_naming_the_field():
    """Its best epoch is read back from the checkpoints Ray Train keeps, which local mode does not."""
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        load_config(FinetuneJobConfig, "configs/finetune/local-esc50.yaml", ["scaling.num_workers=0"])
