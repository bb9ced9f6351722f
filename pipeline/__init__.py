"""The Ray layer: featurize audio with Ray Data, pretrain with Ray Train, sweep with Ray Tune, track in MLflow.

It uses the model library's public modules (``ssamba``, ``ssamba.features``, ``metrics``, ``probes``,
``checkpoint``, ``pretrained``, ``finetune``), never its internals (blocks, mixer, ops).
"""
