"""Fine-tune an LM student on a route's logged chats, and distil a route end to end.

Read top to bottom: :func:`train_lm` is the training loop (LoRA by default, full fine-tuning for tiny
models; cross-entropy on answer tokens, plus a KL term against the teacher's top-k distribution when
examples carry one); it checkpoints every ``checkpoint_every`` steps into ``<work_dir>/checkpoint`` and
resumes from there when started again with the same settings. :func:`distill_lm_route` is the whole
pipeline: ledger pairs -> split by time -> train -> evaluate against the teacher -> calibrate ->
artifact -> registry row, promoted when it covers more validation traffic than the live version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distiller.lm.config import LMTrainConfig
from distiller.lm.data import IGNORE, Example

__all__ = ["torch_threads", "TrainResult", "TrainingInterrupted", "train_lm", "distill_lm_route", "save_student_weights"]

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after_step`` is reached (tests use it to simulate a crash)."""


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (process-wide), restoring the previous count afterwards."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    steps: int
    seconds: float
    device: str
    distillation: str  # "sequence" | "token-kl"
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


# --------------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors, JSON for the rest (no pickle)
# --------------------------------------------------------------------------------------------
def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, step: int, config: LMTrainConfig, losses: list[float]) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    params = _trainable(model)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "weights.safetensors"))
    names = list(params)
    index = {id(p): names[i] for i, p in enumerate(params.values())}
    tensors, scalars = {}, {}
    for pid, state in optimizer.state.items():
        name = index[id(pid)]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{key}"] = value
    tensors["__rng_cpu__"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "checkpoint.json").write_text(
        json.dumps(
            {
                "step": step,
                "config": config.to_dict(),
                "fingerprint": config.fingerprint(),
                "scheduler": scheduler.state_dict(),
                "lrs": [g["lr"] for g in optimizer.param_groups],
                "optimizer_scalars": scalars,
                "losses": losses,
                "saved": time.time(),
            },
            default=float,
        )
    )
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, config: LMTrainConfig) -> tuple[int, list[float]] | None:
    import torch
    from safetensors.torch import load_file

    meta_path = path / "checkpoint.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != config.fingerprint():
        log.warning("checkpoint in %s was made with other settings; starting afresh", path)
        return None
    params = _trainable(model)
    weights = load_file(str(path / "weights.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    state = load_file(str(path / "optimizer.safetensors"))
    scalars = meta.get("optimizer_scalars", {})
    for name, p in params.items():
        entry: dict[str, Any] = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if f"{name}::{key}" in state:
                value = state[f"{name}::{key}"]
                entry[key] = value if key == "step" else value.to(p.device)
            elif f"{name}::{key}" in scalars:
                entry[key] = scalars[f"{name}::{key}"]
        if entry:
            optimizer.state[p] = entry
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, meta["lrs"]):
        group["lr"] = lr  # the scheduler sets it only on its next step
    torch.set_rng_state(state["__rng_cpu__"])
    return int(meta["step"]), list(meta.get("losses", []))


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------
def _collate(batch: Sequence[Example], pad_id: int, device: str) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    kl_rows, kl_pos, kl_ids, kl_probs = [], [], [], []
    k = max((len(t[1]) for e in batch for t in e.teacher), default=0)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        for pos, tids, probs in e.teacher:
            kl_rows.append(row)
            kl_pos.append(pos)
            # pad the top-k lists: padded slots carry zero teacher probability
            kl_ids.append(list(tids) + [tids[0]] * (k - len(tids)))
            kl_probs.append(list(probs) + [0.0] * (k - len(probs)))
    out = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    if kl_rows:
        out["kl"] = (
            torch.tensor(kl_rows, device=device),
            torch.tensor(kl_pos, device=device),
            torch.tensor(kl_ids, device=device),
            torch.tensor(kl_probs, device=device, dtype=torch.float32),
        )
    return out


def _loss(model: Any, batch: dict[str, Any], config: LMTrainConfig) -> Any:
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shift_logits = logits[:, :-1]
    shift_labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE)
    if "kl" not in batch or config.kl_weight <= 0:
        return ce
    rows, pos, ids, probs = batch["kl"]
    student_logp = (logits[rows, pos] / config.kl_temperature).log_softmax(dim=-1).gather(1, ids)
    teacher_logp = probs.clamp_min(1e-12).log()
    # forward KL(teacher || student) over the teacher's reported top-k tokens
    kl = (probs * (teacher_logp - student_logp)).sum(dim=-1).mean() * config.kl_temperature**2
    return (1 - config.kl_weight) * ce + config.kl_weight * kl


def _prepare_model(config: LMTrainConfig, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and config.method == "lora" else torch.float32
    from router.lm_base import resolve_base

    base_path = resolve_base(config.base_model).path  # a packaged name is converted once, then read from the cache
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.to(device)
    return model, tokenizer


def train_lm(
    config: LMTrainConfig,
    examples: Sequence[Example],
    work_dir: str | Path,
    *,
    stop_after_step: int | None = None,
) -> TrainResult:
    """Fine-tune ``config.base_model`` on ``examples``; resumes from ``work_dir/checkpoint`` if present.

    Deterministic for a given seed on CPU: the batch order of each epoch is a seeded permutation, so
    a resumed run sees exactly the batches an uninterrupted run would have.
    """
    with torch_threads(config.torch_threads):
        return _train(config, examples, work_dir, stop_after_step=stop_after_step)


def _train(
    config: LMTrainConfig,
    examples: Sequence[Example],
    work_dir: str | Path,
    *,
    stop_after_step: int | None,
) -> TrainResult:
    import torch
    from tqdm.auto import tqdm

    from router.lm_student import pick_device

    if not examples:
        raise ValueError("No training examples: the route has no usable teacher pairs.")
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model, tokenizer = _prepare_model(config, device)
    model.train()
    pad_id = tokenizer.pad_token_id
    n = len(examples)
    per_epoch = math.ceil(n / (config.batch_size * config.grad_accum))
    total = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = int(total * config.warmup_ratio)

    def schedule(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ckpt = Path(work_dir) / "checkpoint"
    start, losses = 0, []
    if ckpt.exists():
        restored = _load_checkpoint(ckpt, model, optimizer, scheduler, config)
        if restored is not None:
            start, losses = restored
            log.info("resuming LM training from step %d of %d (%s)", start, total, ckpt)
    uses_kl = any(e.teacher for e in examples) and config.kl_weight > 0

    def micro_batches(step: int) -> list[list[Example]]:
        epoch, index = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        span = config.batch_size * config.grad_accum
        chosen = [examples[i] for i in order[index * span : (index + 1) * span]]
        return [chosen[i : i + config.batch_size] for i in range(0, len(chosen), config.batch_size)]

    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="lm student", unit="step", disable=not config.progress, leave=False)
    for step in range(start, total):
        optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(step)
        step_loss = 0.0
        for chunk in chunks:
            loss = _loss(model, _collate(chunk, pad_id, device), config) / len(chunks)
            loss.backward()
            step_loss += float(loss.detach())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
            _save_checkpoint(ckpt, model, optimizer, scheduler, done, config, losses)
        if stop_after_step is not None and done >= stop_after_step and done < total:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {done} of {total}")
    bar.close()
    model.eval()
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        steps=total,
        seconds=time.perf_counter() - t0,
        device=device,
        distillation="token-kl" if uses_kl else "sequence",
        losses=losses,
        resumed_from=start,
    )


def save_student_weights(result: TrainResult, config: LMTrainConfig, directory: Path) -> str:
    """Write the trained weights into an artifact directory; returns ``"adapter"`` or ``"full"``.

    LoRA: ``adapter/`` (PEFT's adapter_config.json + adapter_model.safetensors, what vLLM loads).
    Full fine-tuning: ``model/`` (config + model.safetensors). The tokenizer (with its chat template)
    goes to ``tokenizer/`` either way.
    """
    model = result.model
    if config.method == "lora":
        model.save_pretrained(str(directory / "adapter"), safe_serialization=True)
        weights = "adapter"
    else:
        model.save_pretrained(str(directory / "model"), safe_serialization=True)
        weights = "full"
    result.tokenizer.save_pretrained(str(directory / "tokenizer"))
    return weights


# --------------------------------------------------------------------------------------------
# a route, end to end
# --------------------------------------------------------------------------------------------
def _usable(pair: Any) -> bool:
    # truncated answers would teach the student to stop mid-sentence
    return bool(pair.answer and pair.answer.strip()) and pair.finish_reason in (None, "stop")


def distill_lm_route(
    ledger_path: str | Path,
    route: str,
    config: LMTrainConfig,
    *,
    artifacts_dir: str | Path | None = None,
    judge: Callable[[list[dict[str, Any]], str, str], tuple[bool, float]] | None = None,
    work_dir: str | Path | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Distil ``route`` into an ``lm`` student, register it, and promote it if it beats the live one.

    Returns a summary: ``{"route", "version", "status", "artifact_path", "checksum", "metrics",
    "distillation", "train_pairs", "val_pairs", "train_seconds"}``. ``judge(messages, teacher,
    student) -> (agree, cost_usd)`` optionally asks the teacher to judge ``config.judge_sample`` pairs.
    """
    from store import Ledger

    from distiller.dataset import weighted_pairs
    from distiller.lm import evaluate
    from distiller.lm.data import build_examples
    from distiller.lm.registry import gate_lm, next_version, register_student
    from router.artifact import new_artifact_dir, write_manifest

    if not config.base_model:
        raise ValueError("LMTrainConfig.base_model is empty: name a Hugging Face model id or a local path.")
    ledger = Ledger(ledger_path)
    # shadow checks included and weighted, so validation, the curve and the gate stand for the traffic
    pairs = [p for p in weighted_pairs(ledger, route) if _usable(p)]
    if config.max_pairs:
        pairs = pairs[-config.max_pairs :]
    pairs.sort(key=lambda p: (p.ts, p.id))
    if config.answer_grammar == "auto":
        structured = _distill_structured_if_eligible(ledger, route, pairs, config, artifacts_dir=artifacts_dir,
                                                     promote=promote)
        if structured is not None:
            return structured
    n_val = max(config.min_val_pairs, int(round(len(pairs) * config.val_fraction)))
    if len(pairs) < n_val + 1:
        raise ValueError(f"Route {route!r} has {len(pairs)} usable pairs; at least {n_val + 1} are needed.")
    train_pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]  # newest validate: the future looks like them
    route_row = ledger.route(route) or {"settings": {}}
    target = config.target_agreement or float(route_row["settings"].get("target_agreement") or 0.98)

    own_work = work_dir is None
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix=f"kdgate-lm-{route}-"))
    try:
        from transformers import AutoTokenizer

        from router.lm_base import resolve_base

        tokenizer = AutoTokenizer.from_pretrained(resolve_base(config.base_model).path)
        examples, stats = build_examples(
            tokenizer, train_pairs, max_seq_len=config.max_seq_len, use_teacher_logprobs=config.token_kl == "auto"
        )
        if stats["kl_logged"] and not stats["kl_aligned"]:
            log.info("route %s: teacher logprobs were logged but the tokenizers differ; sequence-level only", route)
        result = train_lm(config, examples, work)
        with torch_threads(config.torch_threads):
            report = evaluate.evaluate_student(
                result.model, result.tokenizer, val_pairs, config, target=target, judge=judge, device=result.device
            )
        version = next_version(ledger, route)
        root = Path(artifacts_dir) if artifacts_dir else (
            Path(ledger.path).resolve().parent / "artifacts" if ledger.path else Path("artifacts").resolve())
        directory = new_artifact_dir(root, route, version)
        weights = save_student_weights(result, config, directory)
        result.model = None  # the live version is run next: one model in memory at a time
        gate = gate_lm(ledger, route, val_pairs, report.confidence, report.agree, report.curve, target=target,
                       target_confidence=route_row["settings"].get("target_confidence"),
                       batch_size=config.eval_batch_size, progress=config.progress)
        metrics = {
            **report.metrics,
            "gate": gate.to_dict(),
            "train_seconds": round(result.seconds, 3),
            "train_steps": result.steps,
            "distillation": result.distillation,
            "kl_pairs": stats["kl_aligned"],
            "device": result.device,
        }
        answer_format = evaluate.answer_format([p.answer for p in pairs])
        manifest = {
            "kind": "lm",
            "route": route,
            "version": version,
            "created": time.time(),
            "base_model": config.base_model,
            "weights": weights,
            "method": config.method,
            "chat_template": result.tokenizer.chat_template,
            "distillation": result.distillation,
            "calibration": report.calibrator.to_json(),
            "metrics": metrics,
            "generation": {"max_tokens": config.max_new_tokens},
            "train_config": config.to_dict(),
            "answer_format": answer_format,
        }
        checksum = write_manifest(directory, manifest)
        row = register_student(
            ledger,
            route=route,
            version=version,
            kind="lm",
            train_pairs=len(examples),
            val_pairs=len(val_pairs),
            metrics=metrics,
            curve=report.curve,
            calibration=report.calibrator.to_json(),
            artifact_path=str(directory),
            checksum=checksum,
            promote=promote,
            gate=gate,
        )
        ledger.record_event(route, "student_trained", detail={"version": version, "kind": "lm", "status": row["status"], **{k: metrics[k] for k in ("agreement", "coverage_at_target", "distillation")}})
        return {
            "route": route,
            "version": version,
            "status": row["status"],
            "artifact_path": str(directory),
            "checksum": checksum,
            "metrics": metrics,
            "distillation": result.distillation,
            "train_pairs": len(examples),
            "val_pairs": len(val_pairs),
            "train_seconds": result.seconds,
        }
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _distill_structured_if_eligible(
    ledger: Any, route: str, pairs: Sequence[Any], config: LMTrainConfig, *, artifacts_dir: str | Path | None,
    promote: bool,
) -> dict[str, Any] | None:
    """A JSON extraction route whose answers the answer grammar expresses gets a structured student
    (:mod:`distiller.lm.structured`); None for any other route, which gets the free-text student.

    Decided on the training pairs with the route's template stripped, as the student would read
    them; the reason is recorded as a route event either way.
    """
    from transformers import AutoTokenizer

    from distiller.lm import evaluate, structured
    from router.lm_base import resolve_base
    from router.template import learn_template

    cfg = structured.StructuredConfig.from_lm_config(config)
    n_val = min(max(cfg.min_val_pairs, int(round(len(pairs) * cfg.val_fraction))), cfg.max_val_pairs)
    train_pairs = pairs[:-n_val] if len(pairs) > n_val else pairs
    answers = [p.answer for p in train_pairs]
    if not answers or evaluate.answer_format(answers) != "json":
        return None
    template = learn_template([p.messages for p in train_pairs])
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(cfg.base_model).path)
    schema, why = structured.eligible(tokenizer, [template.strip(p.messages) for p in train_pairs], answers,
                                      min_coverage=cfg.min_coverage, max_enum=cfg.max_enum, order=cfg.answer_order)
    ledger.record_event(route, "distill.lm_kind", actor="distiller",
                        detail={"kind": structured.KIND if schema is not None else "lm", "reason": why})
    if schema is None:
        log.info("route %s: the free-text LM student (%s)", route, why)
        return None
    log.info("route %s: a structured LM student (%s)", route, why)
    return structured.distill_structured_route(ledger, route, pairs, cfg, artifacts_dir=artifacts_dir, promote=promote,
                                               schema=schema, template=template)
