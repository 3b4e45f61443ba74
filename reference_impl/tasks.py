"""Toy task with a learnable reward, for the embedded random-init models.

`word-start`: prompts are random ordinary Qwen3 tokens; the reward is the fraction of completion tokens that
start a word (their BPE string begins with 'Ġ', a leading space). About 4 in 10 tokens do, so a random
policy gets ~0.4 with real spread inside each group (GRPO needs that), and a policy can reach 1.0 by
concentrating on such tokens: a tiny random-init model improves within tens of steps. A user with a real
model and task plugs in their own `Task` with the same two methods.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .models import QWEN3_TEXT_TOKENS


@lru_cache(maxsize=4)
def word_start_ids(tokenizer_dir: str) -> frozenset[int]:
    """Ids of ordinary tokens whose byte-level BPE string starts with 'Ġ' (a space)."""
    vocab = json.loads((Path(tokenizer_dir) / "vocab.json").read_text())
    return frozenset(i for tok, i in vocab.items() if tok.startswith("Ġ") and i < QWEN3_TEXT_TOKENS)


@dataclass
class WordStartTask:
    tokenizer_dir: str
    prompt_len: int = 16
    seed: int = 0
    name: str = "word-start"
    _targets: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self):
        self._targets = word_start_ids(str(self.tokenizer_dir))
        if not self._targets:
            raise ValueError(f"{self.tokenizer_dir}/vocab.json has no word-start tokens: not a Qwen-style BPE")

    def prompts(self, step: int, count: int) -> list[list[int]]:
        """New prompts every step (same prompts each step would inflate prefix-cache hits)."""
        rng = random.Random(f"{self.seed}:{step}")
        return [[rng.randrange(QWEN3_TEXT_TOKENS) for _ in range(self.prompt_len)] for _ in range(count)]

    def reward(self, prompt_ids: list[int], completion_ids: list[int]) -> float:
        if not completion_ids:
            return 0.0
        return sum(t in self._targets for t in completion_ids) / len(completion_ids)
