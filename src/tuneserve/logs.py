"""One logging format for the whole process (CLI and server)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, datefmt="%H:%M:%S", force=True)
    # These are chatty at INFO and say nothing a user acts on.
    for noisy in ("httpx", "urllib3", "gradio", "multipart"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
