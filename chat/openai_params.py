"""Chat-completion requests without the OpenAI SDK's per-message type walk.

Before every request the SDK runs its parameters through `async_maybe_transform`, which walks
the data against the parameter TypedDicts to rename aliased keys and format dates or files. It
walks each message through every member of the message union, so its cost grows with the
conversation: ~0.3 ms of CPU per message on this project's 2-core machine, 11 ms per model
request in a 40-message conversation, blocking the event loop every stream shares.

The chat-completion parameters have no aliases and no formats (checked at install, over the
whole type tree), so for them that walk can only drop omitted values, turn iterables into lists
and dump pydantic models. `plain` does exactly that, in one pass over the data. If an SDK
release adds an alias or a format anywhere in those types, `install` leaves the SDK alone.
The names used here are the SDK's private ones: import this module only through
chat/openai_fast.py, which keeps the SDK's own transform when any of them is gone.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from typing import Any

import pydantic
from openai._compat import model_dump
from openai._utils import _transform as sdk_transform
from openai._utils import is_given
from openai.resources.chat.completions import completions as sdk_completions
from openai.types.chat import completion_create_params

_PARAMS = (
    completion_create_params.CompletionCreateParamsStreaming,
    completion_create_params.CompletionCreateParamsNonStreaming,
)


def changes_data(tp: Any, seen: set[int] | None = None) -> bool:
    """True if the SDK's transform could rename or reformat something of type `tp`."""
    seen = set() if seen is None else seen
    if id(tp) in seen:
        return False
    seen.add(id(tp))
    if typing.get_origin(tp) is typing.Annotated:
        for meta in tp.__metadata__:
            if isinstance(meta, sdk_transform.PropertyInfo) and (meta.alias or meta.format):
                return True
    if typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return any(changes_data(h, seen) for h in hints.values())
    return any(changes_data(arg, seen) for arg in typing.get_args(tp) if not isinstance(arg, str))


def plain(data: Any) -> Any:
    """The SDK's transform of `data`, for types where it renames and reformats nothing."""
    if isinstance(data, Mapping):
        return {k: plain(v) for k, v in data.items() if is_given(v)}
    if isinstance(data, list | tuple):
        return [plain(v) for v in data]
    if isinstance(data, pydantic.BaseModel):
        return model_dump(
            data, exclude_unset=True, mode="json", exclude=getattr(data, "__api_exclude__", None)
        )
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | bytearray):
        return [plain(v) for v in data]
    return data


_sdk_maybe_transform = sdk_completions.async_maybe_transform


async def _maybe_transform(data: object, expected_type: object) -> Any:
    if data is not None and expected_type in _PARAMS:
        return plain(data)
    return await _sdk_maybe_transform(data, expected_type)


def install() -> bool:
    """Use `plain` for chat-completion parameters, if the SDK's types allow it; True if in use."""
    if sdk_completions.async_maybe_transform is _maybe_transform:
        return True
    if any(changes_data(tp) for tp in _PARAMS):
        return False
    sdk_completions.async_maybe_transform = _maybe_transform
    return True
