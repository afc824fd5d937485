"""export: the trained model and per-client sub-models leave a run for devices, and devices' updates come back.

Needs no TFF (and starts no TFF worker): everything here reads a run directory with plain TensorFlow and numpy.
"""
