"""Server-sent events, and a chat-completions stream read as a sequence of answer blocks.

Every surface's stream converter is fed the gateway's chat-completions chunks (from a teacher or a
student). :class:`ChatStreamReader` turns them into what all three surfaces think in: the answer's
blocks in order (a text block, tool calls, perhaps more text), each one opened, grown by fragments
and closed. A surface then only says how one block opens, grows and closes on its wire.

A block is closed when the next one opens (the way OpenAI-compatible producers stream: one tool
call's fragments all arrive before the next call's) and at the end of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

__all__ = ["event", "data", "DONE", "Block", "Step", "ChatStreamReader"]

DONE = b"data: [DONE]\n\n"


def event(name: str, payload: dict[str, Any]) -> bytes:
    """One SSE event with an ``event:`` line (Responses and Messages streams)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def data(payload: dict[str, Any]) -> bytes:
    """One SSE event without an event name (chat and legacy completions streams)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass
class Block:
    """One block of an answer: its text, or one tool call (``text`` then holds the arguments)."""

    kind: Literal["text", "tool"]
    position: int  # among the answer's blocks, from 0: the surface's output / content index
    text: str = ""
    call_id: str | None = None
    name: str = ""


# ("open", block, "") | ("delta", block, fragment) | ("close", block, "")
Step = tuple[str, Block, str]


class ChatStreamReader:
    """Reads the first choice of a chat-completions stream, one parsed chunk at a time.

    ``feed`` and ``close`` return the steps the chunk amounts to; ``blocks``, ``finish_reason``,
    ``usage``, ``model`` and ``stop_reason`` (vLLM's matched stop string) hold what was read so far.
    Refusal deltas count as text; reasoning deltas are not part of the answer and are skipped.
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self._open: Block | None = None
        self._calls: dict[int, Block] = {}  # chat's tool-call index -> its block

    def feed(self, chunk: dict[str, Any]) -> list[Step]:
        steps: list[Step] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("model") and self.model is None:
            self.model = chunk["model"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for text in (delta.get("content"), delta.get("refusal")):
                if isinstance(text, str) and text:
                    if self._open is None or self._open.kind != "text":
                        steps += self._start(Block("text", len(self.blocks)))
                    steps += self._grow(self._open, text)
            for call in delta.get("tool_calls") or []:
                steps += self._tool_fragment(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self.stop_reason = choice.get("stop_reason")
        return steps

    def close(self) -> list[Step]:
        """Close the open block (at the end of the stream)."""
        if self._open is None:
            return []
        block, self._open = self._open, None
        return [("close", block, "")]

    def _start(self, block: Block) -> list[Step]:
        steps = self.close()
        self.blocks.append(block)
        self._open = block
        return steps + [("open", block, "")]

    def _grow(self, block: Block, fragment: str) -> list[Step]:
        block.text += fragment
        return [("delta", block, fragment)]

    def _tool_fragment(self, call: dict[str, Any]) -> list[Step]:
        fn = call.get("function") or {}
        index = call.get("index", len(self._calls))
        block = self._calls.get(index)
        steps: list[Step] = []
        if block is None:
            block = Block("tool", len(self.blocks), call_id=call.get("id"), name=fn.get("name") or "")
            self._calls[index] = block
            steps += self._start(block)
        elif fn.get("name"):
            block.name += fn["name"]
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            if block is self._open:
                steps += self._grow(block, arguments)
            else:
                # A fragment of a call that is already closed (no known producer interleaves calls):
                # it still counts in the final answer, but its block's events are over.
                block.text += arguments
        return steps
