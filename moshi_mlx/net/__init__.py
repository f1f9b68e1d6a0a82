"""Kyutai's WebSocket protocol at both ends: messages and query, Opus frames, the remote conversation, TLS."""
