"""LLaVA-1.5 style prompts."""

from __future__ import annotations

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def vqa_text(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER}"


def multiple_choice_text(question: str, choices: list[str], hint: str | None = None) -> str:
    lines = []
    if hint:
        lines.append(f"Context: {hint}")
    lines.append(question)
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append(LETTER_ANSWER)
    return "\n".join(lines)


def chat_prompt(processor, text: str, with_image: bool = True) -> str:
    """The full prompt string, using the checkpoint's own chat template where it has one."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image = "<image>\n" if with_image else ""
    return f"USER: {image}{text} ASSISTANT:"
