"""The probe library (``ssamba.probes``) against independent references: a float64 loop for the weighted
k-NN vote, scikit-learn for the logistic probe, per-clip loops for the pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ssamba import PatchGrid, hear
from ssamba.metrics import accuracy
from ssamba.probes import (
    clip_embeddings, column_embeddings, covered_columns, embedding_size, knn_scores, logistic_scores, standardise,
)


def clustered(classes: int, per_class: int, dim: int, spread: float, seed: int,
              task: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around the random centres of ``task``, drawn with ``seed``; one-hot targets."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1000 + task))
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return points, torch.nn.functional.one_hot(labels, classes).double()


def test_knn_vote_matches_a_float64_loop():
    train, targets = clustered(4, 15, 12, 1.5, seed=0)
    held_out, _ = clustered(4, 5, 12, 1.5, seed=1)
    k, temperature = 7, 0.1
    expected = np.zeros((len(held_out), 4))
    for row, query in enumerate(held_out.double().numpy()):
        similarity = []
        for index, point in enumerate(train.double().numpy()):
            cosine = float(query @ point) / (math.sqrt(float(query @ query)) * math.sqrt(float(point @ point)))
            similarity.append((cosine, index))
        similarity.sort(reverse=True)
        total = 0.0
        for cosine, index in similarity[:k]:
            weight = math.exp(cosine / temperature)
            expected[row] += weight * targets[index].numpy()
            total += weight
        expected[row] /= total
    got = knn_scores(train, targets, held_out, k=k, temperature=temperature)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_knn_with_more_neighbours_than_training_clips_uses_them_all():
    train, targets = clustered(2, 3, 5, 0.1, seed=2)
    scores = knn_scores(train, targets, train[:2], k=50)
    assert scores.shape == (2, 2) and torch.allclose(scores.sum(dim=1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_logistic_probe_agrees_with_scikit_learn(weight_decay):
    """The same objective as scikit-learn's multinomial logistic regression on standardised features (its C
    is 1 / (2 · n · weight_decay)): held-out accuracy within one point, probabilities close."""
    train, targets = clustered(5, 40, 30, 2.5, seed=3)
    held_out, held_targets = clustered(5, 60, 30, 2.5, seed=4)
    labels = held_targets.argmax(1)

    logits = logistic_scores(train, targets, held_out, weight_decay=weight_decay)
    x, x_held = standardise(train, held_out)
    reference = LogisticRegression(C=1.0 / (2 * len(x) * weight_decay), max_iter=5000, tol=1e-10)
    reference.fit(x.numpy(), targets.argmax(1).numpy())
    ours = accuracy(logits, held_targets)
    theirs = float((reference.predict(x_held.numpy()) == labels.numpy()).mean())
    assert 0.3 < theirs < 1.0  # a task with errors to agree on
    assert abs(ours - theirs) <= 0.01
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), reference.predict_proba(x_held.numpy()), atol=2e-3)


def test_multi_label_logistic_probe_scores_each_class_on_its_own():
    train, _ = clustered(3, 30, 8, 0.5, seed=6)
    both = torch.zeros(len(train), 3, dtype=torch.float64)
    both[:, 0] = train[:, 0] > 0  # class 0: the sign of the first feature
    both[:, 2] = 1.0  # class 2: every clip
    logits = logistic_scores(train, both, train, weight_decay=1e-4, multi_label=True)
    assert ((logits[:, 0] > 0) == (train[:, 0] > 0)).double().mean() > 0.95
    assert (logits[:, 2] > 0).all()


def test_pooled_embeddings_match_a_per_clip_loop_over_the_covered_columns():
    grid = PatchGrid(num_mel_bins=32, target_length=64, fshape=16, tshape=16, fstride=16, tstride=16)
    tokens = torch.randn(3, 1 + grid.num_patches, 5)
    frames = torch.tensor([64, 20, 5])  # all 4 columns, 2 columns (16 + 4 frames), 1 (shorter than a patch)
    assert covered_columns(frames, grid).tolist() == [4, 2, 1]
    patches = tokens[:, 1:].reshape(3, grid.freq_patches, grid.time_patches, 5)
    for pooling in ("mean", "bands", "both"):
        pooled = clip_embeddings(tokens, grid, pooling, frames)
        assert pooled.shape == (3, embedding_size(grid, 5, pooling))
        for clip, columns in enumerate([4, 2, 1]):
            kept = patches[clip, :, :columns]  # (F, columns, D)
            mean = kept.reshape(-1, 5).mean(0)
            bands = torch.cat([kept[band].mean(0) for band in range(grid.freq_patches)])
            expected = {"mean": mean, "bands": bands, "both": torch.cat([mean, bands])}[pooling]
            torch.testing.assert_close(pooled[clip], expected)
    torch.testing.assert_close(clip_embeddings(tokens, grid, "mean"), patches.mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="pooling must be one of"):
        column_embeddings(patches, "max")


def test_hear_pooling_both_puts_the_mean_before_the_bands():
    model = hear.load_model(pooling="both")
    grid = model.grid
    assert model.scene_embedding_size == (grid.freq_patches + 1) * 192
    audio = torch.randn(1, 16_000) * 0.1
    both = hear.get_scene_embeddings(audio, model)
    means = hear.get_scene_embeddings(audio, hear.load_model(pooling="mean"))
    bands = hear.get_scene_embeddings(audio, hear.load_model(pooling="bands"))
    torch.testing.assert_close(both, torch.cat([means, bands], dim=1))
