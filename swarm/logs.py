"""Logging set-up shared by the three command-line tools: one line per event, level from a flag or
POLLEN_LOG_LEVEL."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("POLLEN_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Third-party chatter that is not about Pollen's own events.
    for noisy in ("kademlia", "rpcudp", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
