"""The Ray Train side: the trainer and its worker, the loop's shared pieces, and the probes inside
pretraining.
"""
