"""From the model flags to loaded weights:
where files come from, the checkpoint, `load()`, the memory budget, conversion, stand-ins.
"""
