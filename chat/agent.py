"""The Agent: instructions, model choice and the built-in offline demo model."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator

from pydantic_ai import Agent, DeferredToolRequests
from pydantic_ai.direct import model_request_stream
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    PartDeltaEvent,
    PartStartEvent,
    RetryPromptPart,
    TextPart,
    TextPartDelta,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, infer_model
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel
from pydantic_ai.profiles import ModelProfile

from chat.config import Settings
from chat.mcp import BUILTIN, McpServers, allowed
from chat.tools import ToolDeps, toolset

INSTRUCTIONS = (
    "You are a helpful assistant in a web chat. Answer clearly and use Markdown "
    "(headings, lists, fenced code blocks with a language) where it helps the reader."
)
DEMO_NAME = "demo"


def build_agent(mcp: McpServers | None = None) -> Agent[ToolDeps, str | DeferredToolRequests]:
    """The app's agent. The model is chosen per run, so one agent serves every model.

    Its tools are the built-in ones and those of the MCP servers in `mcp`, each toolset offered
    only to the personas that may use it. A call to a tool that needs approval ends the run with
    `DeferredToolRequests` instead of text (chat/approvals.py resumes it).
    """
    toolsets = [
        toolset.filtered(lambda ctx, tool_def: allowed(ctx, BUILTIN)),
        *(mcp.toolsets() if mcp else ()),
    ]
    return Agent(
        instructions=INSTRUCTIONS,
        name="chat",
        deps_type=ToolDeps,
        toolsets=toolsets,
        output_type=[str, DeferredToolRequests],
    )


class ModelUnavailable(Exception):
    """A configured model cannot be started (unknown name, missing package or key).

    `str()` is the developer's account (for the log); `model` names it for the user's message.
    """

    def __init__(self, message: str, model: str = "") -> None:
        super().__init__(message)
        self.model = model


def resolve_model(name: str | None, settings: Settings) -> Model:
    """Turn a model string into a pydantic-ai Model; None or 'demo' gives the demo model."""
    if not name or name == DEMO_NAME:
        return demo_model(settings)
    try:
        model = infer_model(name)
    except Exception as exc:  # unknown provider, missing SDK or key: all are config errors
        raise ModelUnavailable(f"The model {name!r} could not be started: {exc}", name) from exc
    # An OpenAI-compatible model reads its stream in batches and its requests skip the SDK's
    # per-message type walk, where this SDK release allows (chat/openai_fast.py). Checked
    # through sys.modules: the OpenAI SDK is slow to import, and only loaded if a model needs it.
    openai_models = sys.modules.get("pydantic_ai.models.openai")
    if openai_models is not None and isinstance(model, openai_models.OpenAIChatModel):
        from chat.openai_fast import fast

        model = fast(model, enabled=settings.openai_fast_paths)
    return model


def _prompts(messages: list[ModelMessage]) -> list[str]:
    # A prompt with files is a list: its text is the first item (chat/attachments.py).
    return [
        part.content if isinstance(part.content, str) else part.content[0]
        for m in messages
        if isinstance(m, ModelRequest)
        for part in m.parts
        if isinstance(part, UserPromptPart)
        and (isinstance(part.content, str) or part.content and isinstance(part.content[0], str))
    ]


# The exact phrases that make the demo model call its tools (see `demo_tool_call`).
TRY_PHRASES = (
    ("calculate 12 * (3 + 4)", "calls the `calculate` tool"),
    ("time in Asia/Tokyo", "calls the `current_time` tool"),
    ("search hello", "searches your earlier messages with `search_my_messages`"),
)
TRY_FIRST = (
    "### Things to try\n\n"
    + "\n".join(f"- Send `{phrase}`: the demo model {does}." for phrase, does in TRY_PHRASES)
    + (
        "\n- Send anything else to see how a reply streams in: Markdown, code blocks with a copy "
        "button, tables, and math such as $e^{i\\pi} + 1 = 0$."
        "\n- Edit a message or regenerate the last reply to make a new version; rate a reply with "
        "the thumbs; export the conversation from the header."
    )
)
TRY_AGAIN = "Try " + ", ".join(f"`{p}`" for p, _ in TRY_PHRASES) + " to see its tools at work."


def demo_reply(messages: list[ModelMessage], settings: Settings) -> str:
    """What the demo model says: how to configure a real model, and an echo of the input."""
    prompts = _prompts(messages)
    latest = prompts[-1] if prompts else ""
    quoted = "\n".join("> " + line for line in latest.splitlines()) or "> (empty)"
    earlier = len(prompts) - 1
    keys = ", ".join(f"`{k}`" for k in settings.provider_keys)
    key_note = (
        f"I can see {keys} in the environment, so only `MODEL` is missing."
        if keys
        else "No provider API key is set either."
    )
    intro = TRY_FIRST if earlier == 0 else TRY_AGAIN
    return f"""**This is the offline demo model.** No `MODEL` is configured, so replies come \
from a small built-in script instead of a language model. {key_note}

{intro}

You wrote:

{quoted}

This conversation has **{earlier}** earlier message{"" if earlier == 1 else "s"} in the \
history sent to the model.

### Use a real model

1. Pick any model pydantic-ai supports and set `MODEL`, with the provider's key:

```bash
MODEL=openai-chat:gpt-4o-mini OPENAI_API_KEY=sk-... uv run main.py
```

2. Or run a local model through an OpenAI-compatible server such as Ollama or vLLM:

```bash
OPENAI_BASE_URL=http://localhost:11434/v1 OPENAI_API_KEY=ollama \\
MODEL=openai-chat:llama3.2 uv run main.py
```

Conversations are kept in SQLite, so everything here stays when you switch models."""


_CALC = re.compile(r"(?:calculate|compute|what is|what's)\s+([-+*/%^().\d\s]+\d[)\s]*)", re.I)
_TIME = re.compile(r"\btime\b(?:\s+in\s+([A-Za-z_]+(?:/[A-Za-z_]+)?))?", re.I)


def demo_tool_call(prompt: str) -> tuple[str, dict] | None:
    """Which tool the demo model calls for a prompt, if any: it shows tools working offline."""
    if m := _CALC.search(prompt):
        return "calculate", {"expression": m.group(1).strip()}
    if m := _TIME.search(prompt):
        zone = m.group(1) or "UTC"
        return "current_time", {"timezone": zone}
    if prompt.lower().startswith("search "):
        return "search_my_messages", {"query": prompt[7:].strip()}
    return None


def _tool_results(messages: list[ModelMessage]) -> list:
    last = messages[-1] if messages else None
    if not isinstance(last, ModelRequest):
        return []
    return [p for p in last.parts if isinstance(p, ToolReturnPart | RetryPromptPart)]


def demo_model(settings: Settings, *, delay: float = 0.012) -> FunctionModel:
    """An offline model that streams `demo_reply`, calling a tool first when asked to."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator:
        if results := _tool_results(messages):
            lines = [
                f"The `{r.tool_name}` tool answered:\n\n```\n{_content(r)}\n```" for r in results
            ]
            text = "\n\n".join(lines) + "\n\n*(Offline demo model: a real model would use it.)*"
        else:
            prompts = _prompts(messages)
            call = demo_tool_call(prompts[-1]) if prompts else None
            if call and any(t.name == call[0] for t in info.function_tools):
                name, args = call
                yield {0: DeltaToolCall(name=name, json_args=json.dumps(args))}
                return
            text = demo_reply(messages, settings)
        for piece in re.findall(r"\s*\S+", text):
            yield piece
            await asyncio.sleep(delay)

    # The demo reads no files: attaching an image or a PDF says so (chat/attachments.py).
    profile = ModelProfile(supports_image_input=False, supports_document_input=False)
    return FunctionModel(stream_function=stream, model_name=DEMO_NAME, profile=profile)


def _content(part: ToolReturnPart | RetryPromptPart) -> str:
    if isinstance(part, RetryPromptPart):
        return part.model_response()
    return part.content if isinstance(part.content, str) else json.dumps(part.content, default=str)


# Characters of a title's answer read at most (a title keeps 80).
_TITLE_READ = 1000

TITLE_INSTRUCTIONS = (
    "Write a short title (at most six words) for the conversation below. "
    "Answer with the title only: no quotes, no punctuation at the end."
)


def short_title(text: str, limit: int = 60) -> str:
    """A title from text: its first line, whitespace folded, cut at a word."""
    words = " ".join(text.split())
    if len(words) <= limit:
        return words
    return words[:limit].rsplit(" ", 1)[0] + "…"


async def make_title(model: Model, user_text: str, reply_text: str) -> str:
    """Ask the model for a title for the first exchange; the demo model just shortens the prompt."""
    if model.model_name == DEMO_NAME:
        return short_title(user_text)
    prompt = f"User: {user_text[:2000]}\n\nAssistant: {reply_text[:2000]}"
    request = ModelRequest(parts=[UserPromptPart(prompt)], instructions=TITLE_INSTRUCTIONS)
    text = ""
    # One request straight to the model, no agent run around it: a title needs no tools,
    # history or retries, and the agent's machinery cost three times the request's own CPU
    # (12 against 4 ms per title on bench/fake_model.py), paid once per new conversation.
    async with model_request_stream(model, [request]) as events:
        async for event in events:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                text += event.part.content
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                text += event.delta.content_delta
            if len(text) > _TITLE_READ:  # a model that will not stop: enough for a title
                break
    title = short_title(text.strip().strip("\"'“”").rstrip("."), 80)
    return title or short_title(user_text)
