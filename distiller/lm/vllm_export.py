"""A structured LM student as a plain LoRA adapter that vLLM loads at runtime (``vllm-adapter/``).

The structured student's keys, enum values and end are *extra tokens*: ids past the base vocabulary
with their own input and output rows (``extra.safetensors``). vLLM no longer lets an adapter add
vocabulary (vllm-project/vllm#23540), so the export gives each extra token a **base id it
repurposes** instead, one the route's requests never use, and writes rows for those ids as ordinary
low-rank LoRA on ``embed_tokens`` and ``lm_head``, which vLLM supports for the Llama layout:

- ``embed_tokens``: ``lora_embedding_A`` is one-hot (rank slot j selects repurposed id j) and
  ``lora_embedding_B``'s column j is ``extra_in[j] - E[id_j]``, so the input row of id_j becomes the
  extra token's (a scaled embedding, Gemma's, is scaled after the delta in both PEFT and vLLM);
- ``lm_head``: ``lora_A``'s row j is ``extra_out[j] - W_out[id_j]`` and ``lora_B`` one-hot, so the
  output score of id_j is the extra token's (a tied base's head gets its own delta: vLLM and PEFT apply
  a head adapter to the logits, not to the shared table);
- the trained attention/MLP LoRA, zero-padded to the same rank, its scale folded into ``lora_B``.

One rank for every module (``r = lora_alpha``, so the scale is 1): the larger of the trained rank and
the number of extra tokens, rounded up to a rank vLLM accepts (``--max-lora-rank``). The mapping
``token_ids[j]`` (extra token j -> base id) goes into the manifest (``vllm``); the gateway's vLLM
driver (:mod:`gateway.vllm_structured`) maps the grammar's ids through it. Exact up to the dtype
vLLM computes in: :func:`check_export` compares the PEFT model of the export with the student's own
rows on a request.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from router.lm_grammar import RouteSchema

__all__ = ["VLLM_RANKS", "DIRNAME", "repurposed_ids", "export_vllm_adapter", "check_export"]

log = logging.getLogger(__name__)

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts
DIRNAME = "vllm-adapter"


def repurposed_ids(tokenizer: Any, vocab: int, n: int, used: Iterable[int]) -> list[int]:
    """``n`` base ids for the extra tokens: never in ``used`` (the route's request and prompt ids),
    never a special or added token; the highest ids first (a BPE's last merges, its rarest words)."""
    taken = set(int(i) for i in used)
    taken |= {int(i) for i in (tokenizer.all_special_ids or [])}
    taken |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    out = []
    for i in range(min(vocab, len(tokenizer)) - 1, -1, -1):
        if i not in taken:
            out.append(i)
            if len(out) == n:
                return out
    raise ValueError(f"The base vocabulary has fewer than {n} ids the route never uses.")


def _rank(trained_r: int, n_extra: int) -> int:
    need = max(int(trained_r), int(n_extra))
    for r in VLLM_RANKS:
        if r >= need:
            return r
    raise ValueError(f"{n_extra} extra tokens need a LoRA rank above vLLM's largest ({VLLM_RANKS[-1]}).")


def export_vllm_adapter(directory: str | Path, base_path: str, schema: RouteSchema, tokenizer: Any,
                        used_ids: Iterable[int]) -> dict[str, Any]:
    """Write ``directory/vllm-adapter`` from the student in ``directory`` (``adapter/`` and
    ``extra.safetensors``); returns the manifest's ``vllm`` entry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    trained_cfg = json.loads((directory / "adapter" / "adapter_config.json").read_text())
    trained = load_file(str(directory / "adapter" / "adapter_model.safetensors"))
    if trained_cfg.get("use_rslora") or trained_cfg.get("use_dora") or trained_cfg.get("rank_pattern"):
        raise ValueError("Only plain LoRA adapters (no rsLoRA, DoRA or per-module ranks) are exported for vLLM.")
    r0, alpha0 = int(trained_cfg["r"]), float(trained_cfg["lora_alpha"])
    extra = load_file(str(directory / "extra.safetensors"))
    extra_in = extra["in"].float()
    extra_out = extra.get("out", extra_in).float()
    k = int(extra_in.shape[0])
    rank = _rank(r0, k)
    token_ids = repurposed_ids(tokenizer, schema.base_vocab, k, used_ids)

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    emb_table = base.get_input_embeddings().weight.detach().clone()
    out_table = base.get_output_embeddings().weight.detach().clone()
    targets = trained_cfg["target_modules"]
    if not isinstance(targets, list):
        raise ValueError(f"The trained adapter's target_modules {targets!r} is a pattern; a list is needed.")
    # vLLM matches modules by their last name (q_proj, down_proj, ...); a module the student did not
    # train gets zero factors
    modules = [*sorted({t.rsplit(".", 1)[-1] for t in targets}), "embed_tokens", "lm_head"]
    with warnings.catch_warnings():  # the head's own delta on a tied table is the point (module docstring)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                                                target_modules=modules, task_type="CAUSAL_LM"))
    params = dict(model.named_parameters())
    scale0 = alpha0 / r0
    ids = torch.tensor(token_ids)
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_" in name:
                p.zero_()
        copied = 0
        for key, value in trained.items():
            name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            if name not in params:
                raise ValueError(f"The export has no parameter for the trained adapter's {key}.")
            if ".lora_A." in name:
                params[name][: value.shape[0]] = value.float()
            else:
                params[name][:, : value.shape[1]] = value.float() * scale0
            copied += 1
        ea = next(p for n, p in params.items() if n.endswith("embed_tokens.lora_embedding_A.default"))
        eb = next(p for n, p in params.items() if n.endswith("embed_tokens.lora_embedding_B.default"))
        ha = next(p for n, p in params.items() if n.endswith("lm_head.lora_A.default.weight"))
        hb = next(p for n, p in params.items() if n.endswith("lm_head.lora_B.default.weight"))
        slots = torch.arange(k)
        ea[slots, ids] = 1.0  # (rank, vocab)
        eb[:, :k] = (extra_in - emb_table[ids]).T  # (d, rank)
        ha[:k] = extra_out - out_table[ids]  # (rank, d)
        hb[ids, slots] = 1.0  # (vocab, rank)
    out = directory / DIRNAME
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    log.info("vLLM adapter: %d trained LoRA tensors at rank %d -> %d, %d extra tokens on base ids %d..%d",
             copied, r0, rank, k, min(token_ids), max(token_ids))
    return {"adapter": DIRNAME, "rank": rank, "token_ids": token_ids,
            "serve": "vllm serve BASE --enable-lora --max-lora-rank %d --logprobs-mode processed_logprobs" % rank}


def check_export(directory: str | Path, base_path: str, schema: RouteSchema, token_ids: list[int],
                 prompt_ids: list[int]) -> float:
    """The largest difference between the export (base + ``vllm-adapter`` through PEFT, unmerged, as
    vLLM applies it) and the student itself: the scores of every extra token and of the prompt's own
    base ids after ``prompt_ids`` (which may hold extra ids: they are fed as their base ids), against
    the same pass of the artifact's fp32 engine."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from router.lm_structured import load_structured_model

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text()) if (directory / "manifest.json").is_file() else {}
    manifest = {**manifest, "weights": "adapter", "base_model": base_path, "base_sha256": None,
                "decoding": {"weights": "fp32"}}
    own = load_structured_model(directory, manifest, device="cpu", weights="fp32")
    cache = own.engine.new_cache(len(prompt_ids) + 4)
    h = own.engine.forward([(prompt_ids, cache)])[0][-1]
    mapping = {schema.base_vocab + j: t for j, t in enumerate(token_ids)}
    scored = [*mapping, *sorted({i for i in prompt_ids if i < schema.base_vocab})]  # the extra tokens and copied ids
    mine = own.engine.scores(h, scored)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                     str(directory / DIRNAME)).eval()
    with torch.inference_mode():
        logits = peft(torch.tensor([[mapping.get(i, i) for i in prompt_ids]])).logits[0, -1]
    theirs = logits[torch.tensor([mapping.get(i, i) for i in scored])]
    return float((mine - theirs).abs().max())
