"""The web server behind `python -m moshi_mlx.local_web`:
app and routes, one client's session, security, metadata, start-up.
"""
