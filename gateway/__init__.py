"""Pollen's front end for people without Python: the `pollen` command and the gateway process (chat.petals.dev-
and OpenAI-compatible HTTP/WebSocket APIs, health dashboard). Imports only `client_sdk` and `swarm`.
"""
