"""Each store (ChatStore, PostgresStore) implements the storage Protocol exactly, so either can
sit under the app (the `store` fixture runs each test on both)."""

from __future__ import annotations

import inspect

from chat.storage import Store


def test_the_store_implements_every_method_of_the_interface_with_the_same_signature(store):
    assert isinstance(store, Store)
    wanted = {n for n, _ in inspect.getmembers(Store, inspect.isfunction) if not n.startswith("_")}
    assert wanted, "the Protocol lists no methods"
    for name in wanted:
        assert inspect.signature(getattr(type(store), name)).parameters.keys() == (
            inspect.signature(getattr(Store, name)).parameters.keys()
        ), name


def test_the_app_uses_only_the_interface(store):
    public = {n for n, _ in inspect.getmembers(type(store), inspect.isfunction)}
    interface = {n for n, _ in inspect.getmembers(Store, inspect.isfunction)}
    extra = {n for n in public - interface if not n.startswith("_")}
    assert extra == set(), f"add these to chat/storage.py or make them private: {extra}"
