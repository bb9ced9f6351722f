"""Sweep configs, validated before any Ray work, and the search they give Tune: no services."""

from __future__ import annotations

import pytest

from pipeline import tune as sweeps
from pipeline.config import ConfigError, PretrainJobConfig, load_config
from pipeline.config.sweep import TuneJobConfig, with_values

MASK_PRESET = "configs/tune/local-mask.yaml"
THEN_PROBE_PRESET = "configs/tune/local-mask-then-probe.yaml"


def test_presets_read_their_base_configs_and_apply_changes():
    config = load_config(TuneJobConfig, MASK_PRESET)
    assert config.pretrain.model.embed_dim == 64  # from configs/pretrain/local-tiny.yaml
    assert config.pretrain.train.max_steps == 40  # changed by the sweep preset
    assert config.pretrain.train.batch_size == 8  # kept from the base
    overridden = load_config(TuneJobConfig, MASK_PRESET, ["pretrain.train.max_steps=7"])
    assert overridden.pretrain.train.max_steps == 7


@pytest.mark.parametrize("preset, override, message", [
    (MASK_PRESET, "search.space={optim.lr: {loguniform: [0.0, 0.1]}}", "bounds must be positive"),
    (MASK_PRESET, "search.space={masking.mask_patchez: {grid: [32]}}", r"search.space.masking.mask_patchez = 32: .*no such field"),
    (MASK_PRESET, "search.space={masking.mask_patches: {grid: [32, 500]}}", r"search.space.masking.mask_patches = 500: .*must be below"),
    (MASK_PRESET, "search.space={train.max_steps: {randint: [0, 5]}}", r"search.space.train.max_steps = 0: .*train.max_steps"),
    (MASK_PRESET, "pretrain.base=configs/pretrain/missing.yaml", "pretrain.base: cannot read config"),
    (MASK_PRESET, "sweep=finetune", "fine-tuning sweep needs finetune"),
    (MASK_PRESET, "metric=val_masked_accuracy", "metric: val_masked_accuracy is not reported by pretrain.probe"),
    (MASK_PRESET, "pretrain.probe.every=15", r"pretrain.train.checkpoint_every \(20\) must be a multiple of pretrain.probe.every"),
    (MASK_PRESET, "probe={task: esc50, name: p, storage_path: x, data_root: y, features: z}", "give exactly one"),
    (THEN_PROBE_PRESET, "search.scheduler=asha", "scored after pretraining is scored once"),
    (THEN_PROBE_PRESET, "probe=null", "give exactly one"),
])
def test_invalid_sweeps_fail_naming_the_field(preset, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TuneJobConfig, preset, [override])


def test_invalid_sweep_exits_with_the_field_named(capsys):
    assert sweeps.main(["--config", MASK_PRESET, "--set", "search.num_samples=0"]) == 2
    assert "search.num_samples" in capsys.readouterr().err


def test_with_values_sets_dotted_fields_and_revalidates():
    base = load_config(PretrainJobConfig, "configs/pretrain/local-tiny.yaml")
    changed = with_values(base, {"optim.lr": 0.5, "masking.mask_patches": None, "masking.mask_ratio": 0.75})
    assert changed.optim.lr == 0.5 and changed.optim.schedule == base.optim.schedule
    assert changed.masking.mask_ratio == 0.75 and changed.masking.mask_patches is None
    with pytest.raises(ValueError, match="give exactly one of mask_patches and mask_ratio"):
        with_values(base, {"masking.mask_ratio": 0.75})  # the preset sets a count: clear it to sweep ratios
    assert with_values(base, {"tracking.tracking_uri": "sqlite:////tmp/x.db"}).tracking.tracking_uri == "sqlite:////tmp/x.db"
    with pytest.raises(ValueError, match="optim.lr"):
        with_values(base, {"optim.lr": -1})
    with pytest.raises(ValueError, match="'name' is not a config section"):
        with_values(base, {"name.x": 1})


def test_optuna_proposes_valid_recipes_from_the_space(tmp_path):
    config = load_config(TuneJobConfig, "configs/tune/finetune_esc50.yaml", [f"storage_path={tmp_path}"])
    searcher, concurrency = sweeps.search_algorithm(config, config.search.max_concurrent_trials)
    assert type(searcher).__name__ == "OptunaSearch" and concurrency == 8
    assert searcher.set_search_properties("val_accuracy", "max", sweeps.param_space(config))
    for trial in range(4):
        values = searcher.suggest(f"t{trial}")
        assert set(values) == set(config.search.space) and 1e-5 <= values["optim.lr"] <= 5e-4
        assert with_values(config.finetune, values).batch_size in (24, 48)
