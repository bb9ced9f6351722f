"""Data: object storage, audio sources and their reading and decoding, the feature store and its sharded
destinations, training examples, and the layouts of downstream tasks.
"""
