"""Seeded supervised training of a causal LM on (prompt, answer) pairs.

`train(model, tokenizer, pairs, steps)` is the one loop the zoo uses for pretraining,
full fine-tunes and LoRA adapters, and the loop ATM
(`merging.atm`) uses to fine-tune the current merge on each task. Plain PyTorch: AdamW,
linear warmup then cosine decay (or a constant rate), gradient clipping, loss on the
answer tokens (and the closing eos) only. Batches are drawn from a seeded generator, so
the same seed, inputs and thread count give bit-identical weights on CPU.

For large models on one GPU: `grad_accum` micro-batches per optimizer step, bf16
autocast on CUDA (`mixed_precision`), gradient checkpointing, and LoRA (peft). With
their defaults (1, "no" on CPU, off, None) the loop does exactly what it always did, so
the zoo's weights (and hashes) do not change.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Pair = tuple[str, str]
PairSource = Sequence[Pair] | Callable[[], Pair]


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings for `train(..., lora=...)`; targets all attention and MLP projections by default."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of `<bos> prompt answer <eos>` and labels that are -100 except on `answer <eos>`."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + a, [-100] * len(p) + a


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):  # right padding: positions need no adjusting in training
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def apply_lora(model, spec: LoraSpec):
    """Wraps `model` in a PEFT LoRA model (only the adapter weights train)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def lr_lambda(steps: int, warmup: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Linear warmup over `warmup` steps, then cosine decay to 0 (`cosine`) or a flat rate (`constant`)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mixed_precision` ("auto" | "bf16" | "no") on `device`.

    "auto" is bf16 on a CUDA device that supports it and nothing elsewhere (CPU training
    stays in float32, so its results are reproducible bit for bit)."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no', got {mixed_precision!r}")
    if mixed_precision == "no" or device.type != "cuda":
        if mixed_precision == "bf16" and device.type != "cuda":
            raise ValueError("mixed_precision 'bf16' needs a CUDA device")
        return None
    if mixed_precision == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def train(
    model,
    tokenizer,
    pairs: PairSource,
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    schedule: str = "cosine",
    clip: float = 1.0,
    seed: int = 0,
    lora: LoraSpec | None = None,
    anchor: float = 0.0,
    grad_accum: int = 1,
    mixed_precision: str = "auto",
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
    on_step: Callable[[int, float], None] | None = None,
):
    """Trains `model` for `steps` optimizer steps on (prompt, answer) pairs and returns it (in eval mode).

    `pairs` is either a fixed list (batches are drawn from it with replacement) or a
    zero-argument function returning a fresh pair (an endless generator, as the zoo uses).
    Each step sees `grad_accum` micro-batches of `batch_size` pairs (the loss of each is
    divided by `grad_accum`, so the gradient is that of one batch of `grad_accum * batch_size`).
    With `lora`, the model is wrapped by PEFT first and the returned object is the
    `PeftModel` (save it with `save_pretrained` to get an adapter folder).
    `anchor` > 0 adds `anchor * ||theta - theta_start||^2` to the loss (L2-SP), keeping
    the update small; meant for merge experiments (on an early tiny zoo, anchor 1e-2 moved
    a plain five-way merge from 0.074 to 0.088 average accuracy). The presets do not use it.
    `on_step(step, loss)` is called after every optimizer step (1-based step, the step's
    mean loss); an exception it raises stops training and propagates.
    """
    if grad_accum < 1:
        raise ValueError("grad_accum must be at least 1")
    device = torch.device(device)
    amp = autocast_dtype(mixed_precision, device)
    torch.manual_seed(seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora is not None:
            model.enable_input_require_grads()
    if lora is not None:
        model = apply_lora(model, lora)
    model.to(device).train()
    rng = random.Random(f"batches/{seed}")
    draw: Callable[[], Pair] = pairs if callable(pairs) else (lambda: pairs[rng.randrange(len(pairs))])
    if not callable(pairs) and len(pairs) == 0:
        raise ValueError("train() needs at least one (prompt, answer) pair")
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if anchor else []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, int(warmup * steps)), schedule))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accum):
            batch = _collate([encode_pair(tokenizer, *draw()) for _ in range(batch_size)], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type="cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
                loss = model(**batch).loss
            if anchor:
                loss = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
            (loss / grad_accum if grad_accum > 1 else loss).backward()
            step_loss += loss.item() / grad_accum
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        running += step_loss
        if on_step is not None:
            on_step(step + 1, step_loss)
        if log and log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{steps} loss {running / log_every:.4f} ({time.perf_counter() - t0:.1f}s)")
            running = 0.0
    return model.eval()
