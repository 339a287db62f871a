"""docs/FORKING.md, followed for real: add its example tool in a temporary copy of the
repository and check the agent calls it and the reply shows its result."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run inside the copy: the app on a FunctionModel that calls the new tool, then
# answers with what the tool returned.
SCRIPT = r"""
import asyncio, json, re
from pathlib import Path
from pydantic_ai.messages import ModelRequest, ToolReturnPart
from pydantic_ai.models.function import DeltaToolCall, FunctionModel
from starlette.testclient import TestClient
from chat.config import Settings
import main

async def stream(messages, info):
    names = [t.name for t in info.function_tools]
    last = messages[-1]
    results = [p for p in getattr(last, "parts", []) if isinstance(p, ToolReturnPart)]
    if results:
        yield f"The tool returned {results[0].content}."
        return
    if "word_count" not in names:
        yield "NO-TOOL " + ",".join(names)
        return
    yield {0: DeltaToolCall(name="word_count", json_args=json.dumps({"text": "one two three"}))}

app = main.create_app(Settings.from_env({}, db_path=Path("fork.db"), secret_key="k",
                                        allowed_hosts=("testserver",)),
                      model=FunctionModel(stream_function=stream))
with TestClient(app) as c:
    r = c.post("/send", data={"msg": "count"}, headers={"HX-Request": "true"})
    url = re.search(r'sse-connect="([^"]+)"', r.text).group(1)
    with c.stream("GET", url) as s:
        print(b"".join(s.iter_bytes()).decode())
"""


def documented_tool() -> str:
    doc = (ROOT / "docs/FORKING.md").read_text()
    match = re.search(r"<!-- forking:add-a-tool -->\s*```python\n(.*?)```", doc, re.S)
    assert match, "docs/FORKING.md lost its add-a-tool example"
    return match.group(1)


def copy_repo(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if name.startswith(("chat/", "web/", "components/", "static/")) or name in (
            "main.py",
            "personas.toml",
        ):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, target / name)


def run_in(copy: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=copy, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_adding_a_tool_as_documented_makes_the_agent_call_it(tmp_path):
    copy = tmp_path / "fork"
    copy_repo(copy)
    # Before the change the tool does not exist, so the check below can fail.
    assert "NO-TOOL" in run_in(copy)
    tools = copy / "chat/tools.py"
    tools.write_text(tools.read_text() + "\n\n" + documented_tool())
    out = run_in(copy)
    assert "word_count" in out  # the call is shown in the reply
    assert "The tool returned 3." in out
    assert "event: done\ndata: complete" in out
