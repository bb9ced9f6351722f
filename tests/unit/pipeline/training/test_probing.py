"""The pretraining probe's driver side and bookkeeping, without services: the probe config, the seeded
probe set and what it refuses, and the history a checkpoint keeps."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, PretrainJobConfig, ProbeConfig, load_config
from pipeline.training.probing import ProbeHistory, choose_probe_set
from pipeline.data.storage import S3Config
from support.audio_files import write_pitch_folders

PRESET = "configs/pretrain/local-tiny.yaml"


def probe_settings(root, *extra: str) -> list[str]:
    return [f"probe.data_root={root}", f"probe.features={root}-features", *extra]


def test_probe_metrics_are_named_for_the_task_and_select_by_must_be_one_of_them(tmp_path):
    config = load_config(PretrainJobConfig, PRESET, probe_settings(tmp_path, "train.select_by=probe_linear_accuracy"))
    assert config.probe.metrics == ["probe_knn_accuracy", "probe_linear_accuracy"]
    assert ProbeConfig(task="audioset20k", data_root="a", features="b").metrics == ["probe_knn_mAP", "probe_linear_mAP"]
    with pytest.raises(ConfigError, match="train.select_by: probe_knn_accuracy needs a probe section"):
        load_config(PretrainJobConfig, PRESET, ["train.select_by=probe_knn_accuracy"])
    with pytest.raises(ConfigError, match="train.select_by: probe_linear_accuracy is not a metric of this probe"):
        load_config(PretrainJobConfig, PRESET, probe_settings(tmp_path, "probe.methods=[knn]",
                                                              "train.select_by=probe_linear_accuracy"))
    with pytest.raises(ConfigError, match="probe: methods: each method once"):
        load_config(PretrainJobConfig, PRESET, probe_settings(tmp_path, "probe.methods=[knn, knn]"))
    with pytest.raises(ConfigError, match="probe.pooling"):
        load_config(PretrainJobConfig, PRESET, probe_settings(tmp_path, "probe.pooling=max"))


def test_the_probe_set_is_a_fixed_seeded_subset_that_keeps_the_held_out_share(tmp_path):
    root = write_pitch_folders(tmp_path / "probe", {"train": 10, "validation": 5}, seconds=0.2)
    config = ProbeConfig(data_root=str(root), features=str(tmp_path / "f"), max_clips=15)
    chosen = choose_probe_set(config, S3Config())
    assert chosen.classes == ("high", "low", "mid") and len(chosen.uris) == 15
    assert sum(chosen.held_out) == 5 and all("/validation/" in uri for uri, held in zip(chosen.uris, chosen.held_out)
                                              if held)
    assert choose_probe_set(config, S3Config()) == chosen  # the same clips every time
    other_seed = choose_probe_set(config.model_copy(update={"seed": 1}), S3Config())
    assert other_seed.uris != chosen.uris and len(other_seed.uris) == 15
    everything = choose_probe_set(config.model_copy(update={"max_clips": 1000}), S3Config())
    assert len(everything.uris) == 45
    for uri, target in zip(everything.uris, everything.targets):
        assert everything.classes[target[0]] == uri.split("/")[-2]


def test_a_probe_set_that_cannot_score_is_refused_naming_the_field(tmp_path):
    one_class = tmp_path / "one"
    write_pitch_folders(one_class, {"train": 3, "validation": 2}, seconds=0.2)
    for label in ("mid", "high"):
        for split in ("train", "validation"):
            for path in (one_class / split / label).iterdir():
                path.unlink()
            (one_class / split / label).rmdir()
    with pytest.raises(ConfigError, match=r"probe.data_root: .*1 class \(low\).*at least two"):
        choose_probe_set(ProbeConfig(data_root=str(one_class), features="f"), S3Config())

    no_held_out = tmp_path / "manifest.csv"
    no_held_out.write_text("uri,label,split\n" + "".join(f"{one_class}/train/low/clip00{i}.wav,{label},train\n"
                                                          for i, label in enumerate(["a", "b", "a"])))
    with pytest.raises(ConfigError, match="probe.data_root: .*no held-out clips"):
        choose_probe_set(ProbeConfig(task="manifest", data_root=str(no_held_out), features="f"), S3Config())
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "clip.wav").write_bytes((one_class / "train" / "low" / "clip000.wav").read_bytes())
    with pytest.raises(ConfigError, match="probe.data_root: folders layout: 'clip.wav' lies directly in"):
        choose_probe_set(ProbeConfig(data_root=str(flat), features="f"), S3Config())


def test_probe_history_keeps_each_metric_best_and_the_selected_model_through_a_checkpoint():
    history = ProbeHistory()
    states = iter([{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}])
    history.observe({"probe_knn_accuracy": 0.5, "probe_linear_accuracy": 0.7}, 10, "probe_knn_accuracy",
                    lambda: next(states))
    history.observe({"probe_knn_accuracy": 0.8, "probe_linear_accuracy": 0.6}, 20, "probe_knn_accuracy",
                    lambda: next(states))
    history.observe({"probe_knn_accuracy": 0.8, "probe_linear_accuracy": 0.9}, 30, "probe_knn_accuracy",
                    lambda: next(states))  # a tie does not replace the kept model
    assert history.metrics() == {
        "probe_knn_accuracy": 0.8, "probe_linear_accuracy": 0.9, "best_probe_knn_accuracy": 0.8,
        "best_probe_linear_accuracy": 0.9, "best_probe_knn_accuracy_step": 20.0, "best_probe_linear_accuracy_step": 30.0}
    assert history.selected_step == 20 and history.selected_state["w"].item() == 2.0

    saved = torch.load(_round_trip(history.state_dict()), weights_only=True)
    restored = ProbeHistory()
    restored.load_state_dict(saved)
    assert restored.metrics() == history.metrics() and restored.selected_step == 20
    assert restored.selected_state["w"].item() == 2.0


def _round_trip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
