"""The app's long-lived objects are kept out of the cyclic garbage collector's full passes."""

from __future__ import annotations

import gc


async def test_a_loaded_app_is_frozen_out_of_full_collections(manager, scripted):
    # Every full collection walked the modules of MCP, AG-UI, Redis and the SDKs: once the app
    # is loaded (a RunManager exists), they are frozen (chat/runs.py `_settle_heap`).
    manager(scripted())
    assert gc.get_freeze_count() > 0
