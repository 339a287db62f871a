"""CPU per model request as a conversation grows: the OpenAI SDK's parameter walk vs `plain`.

No web server and no network: the app's agent (with its tools) sends one streamed request
through a mock transport that answers at once, with a history of N earlier exchanges. Printed:
milliseconds of CPU per run, with the SDK's own transform and with chat/openai_params.py.

    uv run python bench/request_cost.py                 # histories of 0, 10, 50 and 200 exchanges
    uv run python bench/request_cost.py --history 0 40 --runs 200
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPLY = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"fake",'
    b'"choices":[{"index":0,"delta":{"content":"Fine."},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def history(exchanges: int) -> list:
    """`exchanges` earlier turns: a question and a reply of a few paragraphs each."""
    from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

    reply = "A paragraph of a previous answer, with **some** Markdown in it. " * 12
    out: list = []
    for i in range(exchanges):
        out.append(ModelRequest(parts=[UserPromptPart(content=f"Question number {i}?")]))
        out.append(ModelResponse(parts=[TextPart(content=reply)]))
    return out


async def cost(exchanges: int, runs: int) -> float:
    """Milliseconds of CPU per run of the app's agent with this much history."""
    import httpx2
    from openai import AsyncOpenAI
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from chat.agent import build_agent
    from chat.openai_stream import batched
    from chat.tools import ToolDeps

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=REPLY)

    client = AsyncOpenAI(
        api_key="x",
        base_url="http://model.test/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    model = batched(OpenAIChatModel("fake", provider=OpenAIProvider(openai_client=client)))
    agent, past = build_agent(), history(exchanges)

    async def one() -> None:
        async with agent.run_stream_events(
            "And now?", model=model, message_history=past, deps=ToolDeps(None, "bench")
        ) as events:
            async for _ in events:
                pass

    for _ in range(3):
        await one()
    start = time.process_time()
    for _ in range(runs):
        await one()
    return 1000 * (time.process_time() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[0, 10, 50, 200])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    from openai.resources.chat.completions import completions as sdk_completions
    from pydantic_ai.models import override_allow_model_requests

    from chat import openai_params

    sdk = sdk_completions.async_maybe_transform
    print(f"{'earlier exchanges':>18} {'SDK walk, ms':>13} {'plain, ms':>10}")
    with override_allow_model_requests(True):
        for n in args.history:
            sdk_completions.async_maybe_transform = sdk
            walked = asyncio.run(cost(n, args.runs))
            assert openai_params.install(), "the SDK's types now rename or reformat something"
            fast = asyncio.run(cost(n, args.runs))
            print(f"{n:>18} {walked:>13.2f} {fast:>10.2f}")


if __name__ == "__main__":
    main()
