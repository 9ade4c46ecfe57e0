"""Data: corpora (sources), token shards on disk (shards), preparing them (prepare), and
batches for training (loader).

Importing this package is cheap and never imports torch; only data.loader does.
"""
