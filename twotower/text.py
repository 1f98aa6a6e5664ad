"""Text in and out: prompts through the chat template, and the ids that end a reply."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt, through the tokenizer's chat template unless chat=False."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the backbone generation config's EOS ids, in that order."""
    ids = []
    for source in (tokenizer.eos_token_id, getattr(model.context_tower.generation_config, "eos_token_id", None)):
        for i in [source] if isinstance(source, int) else (source or []):
            if i not in ids:
                ids.append(i)
    return ids
