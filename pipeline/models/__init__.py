"""Models as files and MLflow models: loaders by URI, MLflow's model flavour, model cards and their
publishing, fine-tuning results.
"""
