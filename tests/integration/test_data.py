"""Training examples from featurize output and on the fly, on a real local Ray cluster."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from support.audio_files import GOOD, write_class_folders
from pipeline import featurize, finetune
from pipeline.config import ExamplesConfig, FeaturizeConfig, FinetuneJobConfig, InputConfig, S3Config, load_config
from pipeline.data.examples import examples_dataset
from pipeline.data.sources import AudioSource, list_sources
from ssamba.features import crop_or_pad, norm_stats, normalize

pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("data")]  # one module fixture


@pytest.fixture(scope="module")
def feature_store(ray_cluster, collection, tmp_path_factory):
    root, _ = collection
    output = tmp_path_factory.mktemp("features")
    featurize.run(load_config(FeaturizeConfig, None, [f"input.uri={root / 'good'}", f"output={output}"]))
    return root, output


def by_uri(rows):
    return {row["uri"]: row for row in rows}


def test_examples_from_features_are_cropped_padded_and_normalised(feature_store):
    _, output = feature_store
    rows = examples_dataset(ExamplesConfig(features=str(output), target_length=64, shuffle=False), S3Config()).take_all()
    assert len(rows) == len(GOOD)
    stored = pq.read_table(f"{output}/features").to_pylist()
    stats = norm_stats("audioset")
    for source in stored:
        raw = torch.from_numpy(np.frombuffer(source["fbank"], np.float16).reshape(source["n_frames"], 128).astype(np.float32))
        expected = normalize(crop_or_pad(raw, 64), stats)
        example = by_uri(rows)[source["uri"]]["fbank"]
        assert example.shape == (64, 128) and example.dtype == np.float32
        np.testing.assert_allclose(example, expected.numpy(), rtol=1e-6)


def test_examples_keep_the_columns_asked_for(feature_store):
    """The examples step itself drops the other columns (a ``select_columns`` after it, fused into the read
    task, held the task's output back until it ended: see ``examples_dataset``)."""
    _, output = feature_store
    config = ExamplesConfig(features=str(output), target_length=64, shuffle=False)
    full = by_uri(examples_dataset(config, S3Config()).take_all())
    chosen = examples_dataset(config, S3Config(), columns=["uri", "fbank"]).take_all()
    assert [set(row) for row in chosen] == [{"uri", "fbank"}] * len(GOOD)
    assert {set(row) == {"fbank", "frames", "label", "uri"} for row in full.values()} == {True}
    for row in chosen:
        np.testing.assert_array_equal(row["fbank"], full[row["uri"]]["fbank"])


def test_on_the_fly_matches_featurize_and_drops_bad_files(feature_store):
    root, output = feature_store
    stored = by_uri(examples_dataset(ExamplesConfig(features=str(output), target_length=128), S3Config()).take_all())
    on_the_fly = examples_dataset(
        ExamplesConfig(audio={"uri": str(root)}, target_length=128), S3Config()).take_all()
    assert set(by_uri(on_the_fly)) == set(stored)  # the bad files under root/bad are dropped
    for uri, row in by_uri(on_the_fly).items():
        np.testing.assert_allclose(row["fbank"], stored[uri]["fbank"], atol=1e-6)


def test_spec_augment_masks_before_normalisation(feature_store):
    _, output = feature_store
    config = ExamplesConfig(features=str(output), target_length=128, augment={"freq_mask": 48, "time_mask": 48})
    rows = examples_dataset(config, S3Config()).take_all()
    stats = norm_stats("audioset")
    masked_value = (0.0 - stats.mean) / (2 * stats.std)
    masked = [np.isclose(row["fbank"], masked_value).all(axis=0).sum() for row in rows]  # fully masked bins
    assert max(masked) > 0


def majority_share(labels: list[str], batch_size: int) -> float:
    """Mean share of the most common class in each full batch."""
    batches = [labels[start : start + batch_size] for start in range(0, len(labels) - batch_size + 1, batch_size)]
    return float(np.mean([max(batch.count(name) for name in set(batch)) / batch_size for batch in batches]))


@pytest.mark.timeout(600)
def test_training_inputs_mix_classes_across_shards_and_epochs(ray_cluster, tmp_path):
    """Class folders (4 classes, 6 shards): batches are as mixed as a random order, every epoch anew."""
    root = write_class_folders(tmp_path / "audio", classes=4, per_class=12)
    output = tmp_path / "features"
    featurize.run(load_config(FeaturizeConfig, None, [f"input.uri={root}", f"output={output}", "shard_size=8"]))
    sources = list_sources(InputConfig(uri=str(root)), S3Config())
    label_of = {source.uri: source.uri.split("/")[-2] for source in sources}
    batch_size = 4
    rng = np.random.default_rng(0)
    labels = sorted(label_of.values())
    random_share = np.mean([majority_share(list(rng.permutation(labels)), batch_size) for _ in range(500)])
    assert majority_share(labels, batch_size) == 1.0  # what reading the folders in order would give

    config = ExamplesConfig(features=str(output), target_length=32, shuffle=True)
    dataset = examples_dataset(config, S3Config())
    pretrain_epochs = [[label_of[uri] for batch in dataset.iter_batches(
        batch_size=batch_size, local_shuffle_buffer_size=config.local_shuffle_buffer) for uri in batch["uri"]]
        for _ in range(2)]

    job = load_config(FinetuneJobConfig, None, [
        "name=mix", f"storage_path={tmp_path / 'ckpt'}", f"features={output}", "task=manifest",
        f"data_root={root}", "target_length=32"])
    classes = sorted(set(label_of.values()))
    labelled = [AudioSource(uri, label) for uri, label in label_of.items()]
    subset = finetune._subset(job, labelled, classes, train=True)
    finetune_epochs = [[classes[int(np.argmax(target))] for batch in subset.iter_batches(
        batch_size=batch_size, local_shuffle_buffer_size=job.shuffle_buffer) for target in batch["target"]]
        for _ in range(2)]

    for epochs in (pretrain_epochs, finetune_epochs):
        assert all(sorted(epoch) == labels for epoch in epochs)  # every example once per epoch
        share = np.mean([majority_share(epoch, batch_size) for epoch in epochs])
        assert abs(share - random_share) < 0.1, (share, random_share)
        assert epochs[0] != epochs[1]
