"""The baseline: seed 001's "Pattern 4: Multi-turn chat endpoint", pointed at the fake model.

FastAPI + `agent.run_stream(...)` + `stream_text(delta=True)`, one JSON `data:` event per delta,
history kept in an in-memory dict. The endpoint body is the seed's, unchanged, except:

- the model string comes from MODEL (the seed hard-codes 'openai:gpt-4o'; in pydantic-ai 2.x
  `openai-chat:` is the chat-completions model the fake server speaks);
- BASELINE_DEBOUNCE=none passes `debounce_by=None`. The seed as written uses the default
  (0.1 s), which groups deltas into 100 ms windows; that default is what the benchmark runs
  unless asked otherwise, and the variant exists to show how much of the baseline's latency
  is that choice.

FastAPI is not a project dependency, so run it with an overlay:

    MODEL=openai-chat:fake OPENAI_BASE_URL=http://127.0.0.1:8100/v1 OPENAI_API_KEY=x \\
        uv run --with fastapi python bench/baseline_server.py --port 8200
"""

import argparse
import json
import os

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessagesTypeAdapter

# `system_prompt=` still exists in pydantic-ai 2.x (beside `instructions=`), so the seed's
# agent is built exactly as written.
app = FastAPI()
agent = Agent(
    os.environ.get("MODEL", "openai-chat:fake"), system_prompt="You are a helpful assistant."
)
_DEBOUNCE = {"debounce_by": None} if os.environ.get("BASELINE_DEBOUNCE") == "none" else {}

# In production use Redis / Postgres — this is an in-memory demo
_sessions: dict[str, bytes] = {}


class ChatRequest(BaseModel):
    session_id: str
    message: str


@app.post("/chat")
async def chat(req: ChatRequest):
    # Load prior history from the session store
    prior_json = _sessions.get(req.session_id, b"[]")
    history = ModelMessagesTypeAdapter.validate_json(prior_json)

    async def event_generator():
        async with agent.run_stream(
            req.message,
            message_history=history,
        ) as stream:
            async for chunk in stream.stream_text(delta=True, **_DEBOUNCE):
                yield f"data: {json.dumps({'text': chunk})}\n\n"

            # Persist updated history after the stream is fully consumed
            await stream.get_output()
            updated = ModelMessagesTypeAdapter.dump_json(stream.all_messages())
            _sessions[req.session_id] = updated

        yield "event: done\ndata: {}\n\n"

    return StreamingResponse(event_generator(), media_type="text/event-stream")


@app.get("/health")
async def health():
    """Readiness probe for the benchmark runner (not part of the seed)."""
    return {"status": "ok", "sessions": len(_sessions)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Seed 001 Pattern 4 baseline server.")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    # Same uvicorn defaults as the app (auto loop/http, info log with access lines).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")
