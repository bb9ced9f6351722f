"""The model card an export writes beside the weights."""

from __future__ import annotations

import json


def test_a_model_card_renders_every_fact_and_round_trips_as_json():
    from pipeline.models.model_card import ModelCard

    card = ModelCard(kind="classifier", run="esc-fold1", run_id="abc123", architecture={"embed_dim": 64},
                     parameters=12345, objective={"task": "esc50"}, data={"features": "s3://f", "rows": 10},
                     training={"epochs": 2}, selected_by={"val_accuracy": 0.5}, fbank={"num_mel_bins": 128},
                     labels=["dog", "rain"], commit="deadbeef")
    page = card.markdown()
    for fact in ("# SSAMBA classifier: esc-fold1", "`abc123`", "`deadbeef`", "| embed_dim | 64 |", "12,345",
                 "| task | esc50 |", "| rows | 10 |", "| val_accuracy | 0.5 |", "| num_mel_bins | 128 |", "dog, rain"):
        assert fact in page, fact
    assert json.loads(card.to_json())["selected_by"] == {"val_accuracy": 0.5}
