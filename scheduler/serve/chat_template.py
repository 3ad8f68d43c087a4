"""The chat template for base (not instruction-tuned) OPT models.

OPT checkpoints ship no chat template: they are plain language models. A chat is rendered
as a transcript the model can continue, and the turn marker of the next user turn is a stop
string so that the model does not write the user's part too:

    <system text>

    User: <text>
    Assistant: <text>
    User: <text>
    Assistant:

What this module does not know: tokens. The prompt is text; the tokenizer adds BOS.
"""

from __future__ import annotations

from .schema import ChatMessage

ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
STOP = ("\nUser:",)


def render_chat(messages: list[ChatMessage]) -> str:
    system = [m.text().strip() for m in messages if m.role in ("system", "developer")]
    lines = []
    for message in messages:
        if message.role in ROLE_NAMES:
            lines.append(f"{ROLE_NAMES[message.role]}: {message.text().strip()}")
    head = "\n".join(s for s in system if s)
    transcript = "\n".join(lines + ["Assistant:"])
    return f"{head}\n\n{transcript}" if head else transcript
