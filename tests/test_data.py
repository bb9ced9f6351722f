"""Training examples from featurize output and on the fly, on a real local Ray cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_files import GOOD
from pipeline import featurize
from pipeline.config import ExamplesConfig, FeaturizeConfig, S3Config, load_config
from pipeline.data import examples_dataset
from ssamba.features import crop_or_pad, norm_stats, normalize

pytestmark = pytest.mark.timeout(300)


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
    stored = featurize.pq.read_table(f"{output}/features").to_pylist()
    stats = norm_stats("audioset")
    for source in stored:
        raw = torch.from_numpy(np.frombuffer(source["fbank"], np.float16).reshape(source["n_frames"], 128).astype(np.float32))
        expected = normalize(crop_or_pad(raw, 64), stats)
        example = by_uri(rows)[source["uri"]]["fbank"]
        assert example.shape == (64, 128) and example.dtype == np.float32
        np.testing.assert_allclose(example, expected.numpy(), rtol=1e-6)


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
