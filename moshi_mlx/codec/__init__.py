"""Mimi, Kyutai's speech codec, as an MLX network (pure MLX: no files of the app, no audio devices).

The network is written from Mimi's published architecture and loads the published checkpoint unchanged;
its streaming state lives beside the weights, so both directions share one copy of them.
"""
