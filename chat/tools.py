"""The agent's tools: one file, one decorator per tool. Add a function here to add a tool.

Each tool's docstring is what the model reads to decide when to call it, and its arguments'
type hints become the JSON schema the model fills in. A tool with an effect the user should
confirm first takes `requires_approval=True` (`@toolset.tool(requires_approval=True)`): the reply
then pauses on the call with Approve / Deny buttons (chat/approvals.py).
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic_ai import FunctionToolset, ModelRetry, RunContext

from chat.storage import Store


@dataclass
class ToolDeps:
    """What tools may use during a run: the store, scoped to the user the run belongs to."""

    store: Store
    owner: str
    # The toolsets the conversation's persona may use ("builtin", MCP server names); None: all.
    toolsets: frozenset[str] | None = None


toolset: FunctionToolset[ToolDeps] = FunctionToolset()


@toolset.tool_plain
def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA timezone such as 'Europe/Paris' or 'UTC'."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ModelRetry(
            f"Unknown timezone {timezone!r}; use an IANA name like 'America/New_York'."
        ) from None
    return datetime.now(zone).strftime("%A %d %B %Y, %H:%M:%S %Z")


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


# Results past this many bits (about 1000 decimal digits) are refused: printing a bigger integer
# is slow (Python refuses past 4300 digits) and no arithmetic question needs one.
_MAX_BITS = 3322


def evaluate(expression: str) -> float | int:
    """Evaluate arithmetic (+ - * / // % ** and parentheses) without eval().

    Raises ValueError for anything else, and for results too large to be useful (huge integers,
    floats that overflow to infinity), so no input can run long or crash the reply.
    """

    def checked(value: float | int) -> float | int:
        if isinstance(value, int) and value.bit_length() > _MAX_BITS:
            raise ValueError("result too large")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("result too large")
        return value

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return checked(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("exponent or base too large")
            return checked(_OPS[type(node.op)](left, right))
        raise ValueError(f"unsupported syntax: {type(node).__name__}")

    if len(expression) > 200:
        raise ValueError("expression too long")
    return walk(ast.parse(expression.replace("^", "**"), mode="eval"))


@toolset.tool_plain
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, e.g. '(12.5 * 4) / 3' or '2 ** 10'."""
    try:
        result = evaluate(expression)
        return (
            f"{expression} = {result:g}"
            if isinstance(result, float)
            else f"{expression} = {result}"
        )
    except ZeroDivisionError:
        raise ModelRetry("Division by zero.") from None
    except (ValueError, SyntaxError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise ModelRetry(f"Cannot evaluate {expression[:200]!r}: {exc}") from None


@toolset.tool
def search_my_messages(ctx: RunContext[ToolDeps], query: str) -> list[dict]:
    """Search this user's earlier conversations for words; returns matching snippets."""
    hits = ctx.deps.store.search(ctx.deps.owner, query, limit=5)
    return [
        {
            "conversation": h["title"],
            "snippet": h["snippet"].replace("\x02", "").replace("\x03", ""),
        }
        for h in hits
    ]
