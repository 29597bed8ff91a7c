"""Fine-tuning the sentence encoder itself on a route's pairs, within a CPU time budget.

Frozen embeddings are not enough for every task (sentiment is the classic case: the nearest
neighbours of a review are about the same film, not the same opinion). Here the encoder and a
linear head per field are trained together with cross-entropy on the heads' targets (soft labels
where the teacher gave logprobs). The heads start from the frozen student's logistic regression,
so training starts from a working model. Training stops when the time budget runs out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distiller.config import DistillerConfig

log = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "FinetuneInterrupted", "finetune_encoder"]


class FinetuneInterrupted(Exception):
    """Fine-tuning was asked to stop (the worker got SIGTERM); nothing is registered."""


@dataclass
class FinetuneResult:
    path: Path  # sentence-transformers directory with the tuned weights (safetensors)
    seconds: float
    steps: int
    epochs: float
    final_loss: float
    stopped_by_budget: bool
    model: Any = None  # the tuned SentenceTransformer, still in memory

    def summary(self) -> dict[str, Any]:
        return {
            "finetune_seconds": round(self.seconds, 2),
            "steps": self.steps,
            "epochs": round(self.epochs, 3),
            "final_loss": round(self.final_loss, 4),
            "stopped_by_budget": self.stopped_by_budget,
        }


def finetune_encoder(
    base_model: str,
    texts: Sequence[str],
    targets: Sequence[Any],
    init_heads: Sequence[Any],
    config: DistillerConfig,
    *,
    out_dir: Path,
    progress: bool = False,
    stop: Any = None,
) -> FinetuneResult:
    """Train the encoder (plus one linear head per target set) and save it to ``out_dir``.

    ``targets`` are :class:`distiller.train.HeadTargets` (a (n, classes) distribution each) and
    ``init_heads`` the frozen student's heads used as the starting point. ``stop`` (a
    threading.Event) aborts training between steps with :class:`FinetuneInterrupted`.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from router.embedding import resolve_model_path

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SentenceTransformer(resolve_model_path(base_model), device="cpu")
    model.max_seq_length = min(int(model.max_seq_length or 512), config.finetune_max_tokens)
    model.train()

    heads = torch.nn.ModuleList()
    for h in init_heads:
        lin = torch.nn.Linear(h.W.shape[1], h.W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(h.W, dtype=np.float32)))
            lin.bias.copy_(torch.from_numpy(np.clip(np.asarray(h.b, dtype=np.float32), -30, 30)))
        heads.append(lin)
    y = [torch.from_numpy(np.asarray(t.targets, dtype=np.float32)) for t in targets]

    n = len(texts)
    bs = config.finetune_batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = max(1, int(steps_per_epoch * config.finetune_epochs))
    optim = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": config.finetune_lr},
            # the heads start from a fitted solution and only need to follow the encoder
            {"params": heads.parameters(), "lr": config.finetune_lr * 20},
        ],
        weight_decay=0.01,
    )
    warmup = max(1, total_steps // 20)

    def lr_scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.05, 1.0 - (step - warmup) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_scale)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="fine-tune encoder", unit="step")
    t0 = time.perf_counter()
    step, loss_ema, stopped = 0, float("nan"), False
    text_list = list(texts)
    while step < total_steps and not stopped:
        order = rng.permutation(n)
        for start in range(0, n, bs):
            if step >= total_steps:
                break
            if stop is not None and stop.is_set():
                raise FinetuneInterrupted("encoder fine-tuning interrupted by a stop request")
            if time.perf_counter() - t0 > config.finetune_budget_s:
                stopped = True
                break
            idx = order[start : start + bs]
            features = model.tokenize([text_list[i] for i in idx])
            emb = model(features)["sentence_embedding"]
            loss = 0.0
            for head, target in zip(heads, y):
                logits = head(emb)
                loss = loss + torch.nn.functional.cross_entropy(logits, target[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            step += 1
            lv = float(loss.detach())
            loss_ema = lv if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * lv
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}")
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir), safe_serialization=True)
    log.info("encoder fine-tuned: %d steps (%.2f epochs) in %.0f s, loss %.3f%s", step, step / steps_per_epoch,
             seconds, loss_ema, " (stopped by the time budget)" if stopped else "")
    return FinetuneResult(
        path=out_dir,
        seconds=seconds,
        steps=step,
        epochs=step / steps_per_epoch,
        final_loss=loss_ema,
        stopped_by_budget=stopped,
        model=model,
    )
