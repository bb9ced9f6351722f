"""Exported classifiers (ssamba.classifier, pipeline.models.loaders) and the selected-epoch report (pipeline.models.results)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchaudio
from sklearn.metrics import confusion_matrix as sklearn_confusion
from sklearn.metrics import precision_recall_fscore_support

from pipeline import embed

from pipeline.models import loaders as models, results
from pipeline.config import ConfigError, EmbedConfig, load_config
from ssamba import (
    AudioClassifier, ClassifierConfig, EncoderConfig, FbankConfig, FeatureSettings, PatchGrid, SSAMBAEncoder,
    load_classifier, save_checkpoint, save_classifier,
)
from ssamba.features import crop_or_pad, norm_stats, normalize, waveform_to_fbank
from ssamba.metrics import confusion_matrix, per_class_scores

CLASSES = ["dog", "rain", "siren"]
SETTINGS = FeatureSettings(FbankConfig(), target_length=64, norm=norm_stats("esc50"), stored_precision="float16")


def trained_model(pooling: str = "mean") -> AudioClassifier:
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(EncoderConfig(embed_dim=32, depth=2, grid=PatchGrid(target_length=64, fstride=10, tstride=10)))
    model = AudioClassifier(encoder, ClassifierConfig(len(CLASSES), pooling))
    with torch.no_grad():  # a head that is not at its init, so every class scores differently
        model.mlp_head[1].weight.normal_()
    return model.eval()


def tone(seconds: float, rate: int, frequency: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.3 * torch.sin(2 * torch.pi * frequency * t) + 0.01 * torch.randn(len(t), generator=torch.Generator().manual_seed(1))


def exported(model: AudioClassifier, activation: str = "softmax", multi_label: bool = False) -> bytes:
    buffer = io.BytesIO()
    save_classifier(buffer, model, CLASSES, SETTINGS, activation, multi_label, metadata={"epoch": 3})
    return buffer.getvalue()


def test_exported_classifier_predicts_what_the_trained_model_does(tmp_path):
    model = trained_model()
    (tmp_path / "classifier.pt").write_bytes(exported(model))
    torch.load(tmp_path / "classifier.pt", weights_only=True)  # plain tensors and primitives
    classifier = load_classifier(tmp_path / "classifier.pt")
    assert classifier.classes == CLASSES and classifier.sample_rate == 16_000 and classifier.metadata == {"epoch": 3}
    waveform = tone(1.2, 16_000)  # longer than 64 frames: cropped to the first 64, as in training
    # What the training loop saw: fbank stored as float16 by featurize, cropped, normalised.
    features = normalize(crop_or_pad(waveform_to_fbank(waveform).half().float(), 64), norm_stats("esc50"))
    with torch.no_grad():
        expected = model(features[None])[0].softmax(dim=-1)
    probabilities = classifier.predict(waveform, 16_000)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)
    assert probabilities.sum().item() == pytest.approx(1.0)
    assert [label for label, _ in classifier.top_k(probabilities, 2)] == [CLASSES[i] for i in expected.argsort(descending=True)[:2]]


def test_multi_label_classifier_uses_sigmoid_and_cls_pooling_survives():
    model = trained_model(pooling="cls")
    classifier = load_classifier(exported(model, "sigmoid", multi_label=True))
    assert classifier.multi_label and classifier.model.config.pooling == "cls"
    raw = waveform_to_fbank(tone(0.5, 16_000))[None]
    with torch.no_grad():
        expected = model(SETTINGS.from_fbank(raw)).sigmoid()
    torch.testing.assert_close(classifier.predict_fbank(raw), expected, rtol=0, atol=1e-6)


def test_predict_resamples_and_mixes_to_mono_like_the_pipeline():
    classifier = load_classifier(exported(trained_model()))
    at_44k = tone(0.8, 44_100)
    resampled = torchaudio.functional.resample(at_44k, 44_100, 16_000)  # what pipeline.data.audio.decode_audio does
    torch.testing.assert_close(classifier.predict(at_44k, 44_100), classifier.predict(resampled, 16_000), rtol=0, atol=0)
    assert not torch.allclose(classifier.predict(at_44k, 44_100), classifier.predict(at_44k, 16_000))
    stereo = torch.stack([resampled, resampled])
    torch.testing.assert_close(classifier.predict(stereo, 16_000), classifier.predict(resampled, 16_000))


def test_predict_batch_equals_predict_of_each_clip_and_ignores_padding():
    classifier = load_classifier(exported(trained_model()))
    clips = [tone(0.3, 16_000, 300.0), tone(1.5, 16_000, 500.0), tone(0.9, 16_000, 700.0)]  # 1.5 s: cut to 64 frames
    expected = torch.stack([classifier.predict(clip, 16_000) for clip in clips])
    batch = classifier.predict_batch(clips, 16_000, batch_size=2)  # two model batches
    assert batch.shape == (3, len(CLASSES))
    torch.testing.assert_close(batch, expected)
    # A padded batch: the padding (noise, not zeros, so that any leak shows) is cut off before the fbank.
    lengths = [len(clip) for clip in clips]
    padded = torch.randn(3, max(lengths) + 1000, generator=torch.Generator().manual_seed(2))
    for row, clip in zip(padded, clips):
        row[: len(clip)] = clip
    torch.testing.assert_close(classifier.predict_batch(padded, 16_000, torch.tensor(lengths), batch_size=2), batch,
                               rtol=0, atol=0)
    stereo = [torch.stack([clip, clip]) for clip in clips]  # (channels, samples) clips and their resampling
    torch.testing.assert_close(classifier.predict_batch(stereo, 16_000), expected)
    at_44k = [tone(0.5, 44_100), tone(1.1, 44_100)]
    torch.testing.assert_close(classifier.predict_batch(at_44k, 44_100),
                               torch.stack([classifier.predict(clip, 44_100) for clip in at_44k]))


def test_predict_windows_covers_a_long_clip():
    model = trained_model()
    classifier = load_classifier(exported(model))
    waveform = tone(2.0, 16_000)  # 198 frames: windows of 64 at 0, 64, 128 and a partial one at 192
    raw = classifier.fbank(waveform, 16_000)
    assert raw.shape[0] == 198
    windows = classifier.predict_windows(waveform, 16_000, batch_size=3)
    assert windows.probabilities.shape == (4, len(CLASSES))
    torch.testing.assert_close(windows.starts, torch.tensor([0.0, 0.64, 1.28, 1.92], dtype=torch.float64))
    # The first window is what predict sees (up to the rounding of batches of another size); the clip cut
    # to one window's samples likewise (its DC removal runs over fewer samples).
    torch.testing.assert_close(windows.probabilities[0], classifier.predict(waveform, 16_000))
    one_window = SETTINGS.fbank.window_size + 63 * SETTINGS.fbank.window_shift
    torch.testing.assert_close(windows.probabilities[0], classifier.predict(waveform[:one_window], 16_000),
                               rtol=1e-4, atol=1e-5)
    # The last window holds the clip's last 6 frames, zero-padded as training pads a short clip.
    torch.testing.assert_close(windows.probabilities[3], classifier.predict_fbank(raw[192:][None])[0])
    torch.testing.assert_close(windows.pooled, windows.probabilities.mean(dim=0))
    assert windows.pooled.sum().item() == pytest.approx(1.0)
    assert [len(row) for row in classifier.top_k_rows(windows.probabilities, 2)] == [2, 2, 2, 2]
    assert classifier.top_k_rows(windows.probabilities, 2)[3] == classifier.top_k(windows.probabilities[3], 2)

    # Overlapping windows stop at the first that reaches the clip's end (160 + 64 >= 198).
    overlapping = classifier.predict_windows(waveform, 16_000, hop_seconds=0.32)
    torch.testing.assert_close(overlapping.starts, torch.arange(6, dtype=torch.float64) * 0.32)
    torch.testing.assert_close(overlapping.probabilities[::2], windows.probabilities[:3])
    short = classifier.predict_windows(tone(0.3, 16_000), 16_000)  # shorter than one window: one, padded
    assert short.starts.tolist() == [0.0]
    torch.testing.assert_close(short.probabilities[0], classifier.predict(tone(0.3, 16_000), 16_000), rtol=0, atol=0)

    tagger = load_classifier(exported(model, "sigmoid", multi_label=True))  # a label present in any window
    tagged = tagger.predict_windows(waveform, 16_000)
    torch.testing.assert_close(tagged.pooled, tagged.probabilities.amax(dim=0), rtol=0, atol=0)


def test_batch_and_window_prediction_refuse_bad_inputs():
    classifier = load_classifier(exported(trained_model()))
    clips = [tone(0.3, 16_000), tone(0.5, 16_000)]
    with pytest.raises(ValueError, match="no waveforms"):
        classifier.predict_batch([], 16_000)
    with pytest.raises(ValueError, match="1 lengths for 2 waveforms"):
        classifier.predict_batch(torch.zeros(2, 8000), 16_000, lengths=[4000])
    with pytest.raises(ValueError, match="length 9000 of clip 1 is not between 1 and its 8000 samples"):
        classifier.predict_batch(torch.zeros(2, 8000), 16_000, lengths=[4000, 9000])
    with pytest.raises(ValueError, match="predict takes one clip"):
        classifier.predict_batch(clips[0], 16_000)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        classifier.predict_batch(clips, 16_000, batch_size=0)
    with pytest.raises(ValueError, match="hop_seconds must be at least one frame"):
        classifier.predict_windows(clips[1], 16_000, hop_seconds=0.001)


def test_loaders_refuse_uris_and_other_files_with_a_pointer(tmp_path):
    with pytest.raises(ValueError, match="pipeline.models.loaders"):
        load_classifier("s3://bucket/classifier.pt")
    model = trained_model()
    buffer = io.BytesIO()
    save_checkpoint(buffer, model.encoder, model.encoder.config)
    with pytest.raises(ValueError, match="not an SSAMBA classifier"):
        load_classifier(buffer.getvalue())
    with pytest.raises(ValueError, match="class names"):
        save_classifier(io.BytesIO(), model, CLASSES[:2], SETTINGS, "softmax", False)


def test_pipeline_loads_any_uri(tmp_path):
    model = trained_model()
    path = tmp_path / "classifier.pt"
    path.write_bytes(exported(model))
    for uri in (str(path), path.as_uri()):
        assert models.load_classifier(uri).classes == CLASSES
    save_checkpoint(tmp_path / "encoder.pt", model.encoder, model.encoder.config)
    assert models.load_checkpoint((tmp_path / "encoder.pt").as_uri()).encoder_config == model.encoder.config
    assert models.load_hear_model(str(tmp_path / "encoder.pt"), pooling="mean").scene_embedding_size == 32


def test_confusion_matrix_and_per_class_scores_match_sklearn():
    rng = np.random.default_rng(0)
    scores, truth = rng.standard_normal((60, 4)), rng.integers(0, 4, 60)
    truth[truth == 3] = 2  # class 3 has no examples: its recall is undefined (0, as sklearn reports)
    targets = np.eye(4)[truth]
    confusion = confusion_matrix(torch.from_numpy(scores), torch.from_numpy(targets))
    np.testing.assert_array_equal(confusion.numpy(), sklearn_confusion(truth, scores.argmax(1), labels=range(4)))
    ours = per_class_scores(confusion)
    expected = precision_recall_fscore_support(truth, scores.argmax(1), labels=range(4), zero_division=0)
    for name, reference in zip(("precision", "recall", "f1", "support"), expected):
        np.testing.assert_allclose(ours[name].numpy(), reference, rtol=1e-12)


def test_selected_summary_and_fold_statistics():
    folds = [results.selected_summary("accuracy", {"epoch": 4, "val_accuracy": 0.5, "train_loss": 1.0}),
             results.selected_summary("accuracy", {"epoch": 2, "val_accuracy": 0.7, "test_accuracy": None}),
             results.selected_summary("accuracy", {"epoch": 9, "val_accuracy": 0.9})]
    assert folds[0] == {"best_epoch": 4.0, "best_val_accuracy": 0.5}
    assert results.selected_summary("mAP", {"epoch": 1, "val_mAP": 0.3, "test_mAP": 0.2}) == {
        "best_epoch": 1.0, "best_val_mAP": 0.3, "test_mAP_at_best": 0.2}
    statistics = results.fold_statistics(folds)
    assert statistics == {"best_val_accuracy_mean": pytest.approx(0.7),
                          "best_val_accuracy_std": pytest.approx(np.std([0.5, 0.7, 0.9]))}


def test_per_class_tables():
    scores = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.5], [0.0, 2.0, 0.1], [0.3, 0.2, 0.1]])
    targets = torch.eye(3)[[0, 1, 2, 2]] > 0.5
    table = results.per_class_table(CLASSES, scores, targets, multi_label=False)
    assert table["class"].tolist() == CLASSES and table["support"].tolist() == [1, 1, 2]
    assert table["recall"].tolist() == [1.0, 1.0, 0.0] and table["precision"].tolist()[:2] == [0.5, 0.5]
    multi = results.per_class_table(CLASSES, scores, targets, multi_label=True)
    assert multi["positives"].tolist() == [1, 1, 2] and multi["average_precision"].tolist()[0] == 1.0


def test_embed_config_needs_a_classifier_to_skip_embeddings(tmp_path):
    with pytest.raises(ConfigError, match="embeddings: none"):
        load_config(EmbedConfig, None, [f"features={tmp_path}", f"output={tmp_path / 'out'}", "embeddings=none"])
    config = load_config(EmbedConfig, None, [f"features={tmp_path}", f"output={tmp_path / 'out'}", "embeddings=none",
                                             f"classifier={tmp_path / 'classifier.pt'}", "top_k=2"])
    assert config.top_k == 2


def test_embedder_writes_top_k_labels_without_an_encoder(tmp_path):
    classifier_path = tmp_path / "classifier.pt"
    classifier_path.write_bytes(exported(trained_model()))
    config = load_config(EmbedConfig, None, [f"features={tmp_path}", f"output={tmp_path / 'out'}", "embeddings=none",
                                             f"classifier={classifier_path}", "top_k=2"])
    raw = waveform_to_fbank(tone(0.7, 16_000)).half()
    table = embed.Embedder(config).embed([{"uri": "a.wav", "chunk": 0, "n_frames": raw.shape[0], "n_mels": raw.shape[1],
                                           "fbank": raw.numpy().tobytes()}])
    assert table.column_names == ["uri", "chunk", "ok", "error", "labels", "probabilities"]
    expected = load_classifier(classifier_path).predict_fbank(raw.float()[None])[0]
    (row,) = table.to_pylist()
    assert row["labels"] == [CLASSES[i] for i in expected.argsort(descending=True)[:2]]
    np.testing.assert_allclose(row["probabilities"], expected.sort(descending=True).values[:2].numpy(), rtol=1e-6)
