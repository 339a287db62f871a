"""What an in-flight pydantic-ai run holds in memory on its own, without any web server.

The floor under the `streams` figure: N agent runs at once against the fake model (slow, so all
stay open), the RSS they add, divided by N. Compare with the app's RSS per open stream
(`run.py --scenario streams`): the difference is what the chat server itself holds per stream.

    uv run python bench/run_floor.py                  # the app's agent (tools) on openai-chat
    uv run python bench/run_floor.py --plain          # an agent without tools
    uv run python bench/run_floor.py --function       # FunctionModel: no HTTP client at all
    uv run python bench/run_floor.py --api iter       # agent.iter() instead of run_stream_events
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def rss_mb() -> float:
    """This process's resident set size, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(agent, model, api: str, seen: set) -> None:
    """One run, read to the end; `seen` records that it has received an event."""
    from pydantic_ai import Agent

    me = id(asyncio.current_task())
    if api == "events":
        async with agent.run_stream_events("hi", model=model, deps=None) as events:
            async for _ in events:
                seen.add(me)
    else:
        async with agent.iter("hi", model=model, deps=None) as run:
            async for node in run:
                if Agent.is_model_request_node(node):
                    async with node.stream(run.ctx) as stream:
                        async for _ in stream:
                            seen.add(me)


async def measure(args: argparse.Namespace, url: str) -> None:
    """Start `args.runs` runs, wait until every one is streaming, report RSS per run."""
    from pydantic_ai import Agent

    from chat.agent import build_agent, resolve_model
    from chat.config import Settings

    os.environ.update(OPENAI_BASE_URL=f"{url}/v1", OPENAI_API_KEY="x")
    model = resolve_model("openai-chat:fake", Settings.from_env())
    if args.function:
        from pydantic_ai.models.function import FunctionModel

        async def slow(messages, info):
            for i in range(24):
                yield f"word{i} "
                await asyncio.sleep(4)

        model = FunctionModel(stream_function=slow)
    agent = Agent(instructions="Be brief.") if args.plain else build_agent()
    warm: set = set()
    await asyncio.wait_for(one(agent, model, args.api, warm), 200)  # imports, first connection
    gc.collect()
    before = rss_mb()
    seen: set = set()
    tasks = [asyncio.create_task(one(agent, model, args.api, seen)) for _ in range(args.runs)]
    deadline = time.monotonic() + 60
    while len(seen) < args.runs and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    gc.collect()
    after = rss_mb()
    print(
        f"{len(seen)}/{args.runs} runs streaming; RSS {before:.1f} -> {after:.1f} MB: "
        f"{1024 * (after - before) / args.runs:.0f} KB per run "
        f"({'FunctionModel' if args.function else 'openai-chat'}, "
        f"{'plain agent' if args.plain else 'app agent'}, {args.api})"
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--plain", action="store_true", help="an agent without tools")
    parser.add_argument("--function", action="store_true", help="FunctionModel, no HTTP")
    parser.add_argument("--api", choices=["events", "iter"], default="events")
    args = parser.parse_args()
    from run import FakeModel  # starts the fake model on a free port, stops it after

    fake = FakeModel()
    try:
        fake.configure(24, 0.25)  # 96 s per reply: every run stays open while measured
        asyncio.run(measure(args, fake.url))
    finally:
        fake.proc.stop()


if __name__ == "__main__":
    main()
