"""Pollen's shared core: wire types, records, errors, DHT client and model families.

Imported by `dht_node`, `shard_server` and `client_sdk`; never imports them. Kept import-light:
nothing here pulls torch until a module that needs it (tensors, models) is imported.
"""

__version__ = "0.1.0"
