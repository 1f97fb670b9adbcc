"""A tiny model trained on a synthetic language, for bf16 correctness checks that mean something.

Random weights give near-uniform next-token distributions: greedy margins are so thin that bf16 rounding
alone flips tokens (HF's own bf16 agrees with its fp32 on under half of the prompts). A trained
checkpoint has the peaked distributions of a real one. No checkpoint can be fetched here, so we train
one in seconds on a language the model can learn perfectly:

- a bank of random "phrases" (6-14 token ids each); a token id occurs in several phrases, so the next
  token depends on more than the current one (attention over the context is needed);
- phrase k is always followed by phrase succ(k) = (7k + 3) mod num_phrases (a bijection);
- a text starts anywhere inside a phrase and runs on deterministically.

Prompts for the checks are cut from the same language, so every continuation is determined."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Language:
    phrases: list[list[int]]

    def successor(self, k: int) -> int:
        return (7 * k + 3) % len(self.phrases)

    def text(self, length: int, rng: random.Random) -> list[int]:
        k = rng.randrange(len(self.phrases))
        out = self.phrases[k][rng.randrange(len(self.phrases[k])):]
        while len(out) < length:
            k = self.successor(k)
            out = out + self.phrases[k]
        return out[:length]


def make_language(low: int, high: int, num_phrases: int = 64, seed: int = 0) -> Language:
    """Token ids in [low, high); num_phrases must be coprime to 7 (succ is then a bijection)."""
    rng = random.Random(seed)
    return Language([[rng.randrange(low, high) for _ in range(rng.randint(6, 14))] for _ in range(num_phrases)])


def train(model_dir: Path, language: Language, *, steps: int = 1500, batch_size: int = 32, seq_len: int = 512,
          lr: float = 3e-3, device: str = "cuda", seed: int = 0) -> dict[str, float]:
    """Train the checkpoint in model_dir (fp32, AdamW, cosine decay) and save it back in place.
    Returns the final loss and next-token accuracy on fresh texts."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = torch.tensor([language.text(seq_len, rng) for _ in range(batch_size)], device=device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.inference_mode():
        batch = torch.tensor([language.text(seq_len, rng) for _ in range(batch_size)], device=device)
        logits = model(input_ids=batch).logits[:, :-1]
        # The first tokens of a text are ambiguous (its phrase is not known yet): score from token 32 on.
        accuracy = (logits.argmax(-1) == batch[:, 1:])[:, 32:].float().mean().item()
    model.save_pretrained(model_dir, safe_serialization=True)
    del model, optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"loss": float(loss.item()), "accuracy": accuracy}
