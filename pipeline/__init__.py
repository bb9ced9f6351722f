"""The Ray layer: featurize audio with Ray Data, pretrain with Ray Train, sweep with Ray Tune, track in MLflow.

It talks to the model library only through ``ssamba``'s public API.
"""
