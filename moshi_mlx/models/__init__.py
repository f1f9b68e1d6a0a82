"""The networks only (mlx.nn):
the LM, its configuration and caches, and the PyTorch name plan. Nothing about files or flags.
"""
