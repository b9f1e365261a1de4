"""Debris: the transaction folders that crashed jobs and losers of publish races leave under the root.

Readers never see them (only a manifest makes a folder visible), so they cost storage, not
correctness; this lists them and, with `cleanup.remove=true`, deletes them. What a manifest or a
`_LATEST` pointer names is never touched, nor a folder begun less than `cleanup.grace_hours` ago.
"""
from __future__ import annotations

import datetime as dt
import logging

from llmemb_dist import storage
from llmemb_dist.config import Config

log = logging.getLogger(__name__)


def cleanup(cfg: Config) -> list[str]:
    """The unreferenced transaction folders under the root (removed when `cleanup.remove`)."""
    c = cfg.cleanup
    debris = storage.unreferenced_transactions(cfg.root, dt.timedelta(hours=c.grace_hours))
    for uri in debris:
        log.info("%s %s", "removing" if c.remove else "unreferenced:", uri)
        if c.remove:
            storage.delete_tree(uri)
    log.info("%d unreferenced transaction folders older than %g h under %s%s", len(debris), c.grace_hours, cfg.root,
             "; removed" if c.remove and debris else "" if not debris else "; rerun with cleanup.remove=true to remove them")
    return debris
