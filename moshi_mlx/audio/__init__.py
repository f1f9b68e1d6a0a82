"""Sound in and out of the process:
the format (frames.py), the Mimi codec, devices, echo cancellation, files, recording.
"""
