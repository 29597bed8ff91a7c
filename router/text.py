"""The text of chat messages: one definition, used wherever a prompt is read as text."""

from __future__ import annotations

from typing import Any

__all__ = ["message_text", "last_user_text"]


def message_text(message: dict[str, Any]) -> str:
    """The text of one chat message: string content, or the text parts of a content list joined by
    newlines (images, audio and other parts carry no text)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def last_user_text(messages: list[Any]) -> str:
    """The last user message's text: what varies between a route's requests, for display."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m)
    return ""
