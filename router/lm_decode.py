"""Greedy grammar-constrained decoding of structured LM students, with a KV cache, batched.

Engines (one per loaded student; the LoRA adapter already merged into the weights):

- :class:`FastLlama` and :class:`FastGemma`: lean forwards for the Llama (SmolLM2) and Gemma 3 text
  layouts on CPU: fused QKV and gate/up weights pre-packed for oneDNN, in bf16 where the CPU has
  bf16 kernels (a pass then costs about the same for 1 row as for 16, so forced and drafted tokens
  are nearly free) and in float32 elsewhere (on an AVX2 CPU a pass of 2-8 rows then costs ~1.3x a
  1-row pass instead of 2x, as each call no longer reorders the weights), a preallocated
  per-request KV cache that can be rolled back, and no LM head: only the ids the grammar allows
  are scored.
- :class:`HFDecoder`: the same interface over any Hugging Face causal LM (other layouts, CUDA).

:func:`decode_batch` runs requests in lockstep, one forward pass for all of them per step:

- **forced tokens**: a step with one allowed id is appended, not predicted, and fed with the next pass;
- **copy speculation**: after a span's first token the next request tokens are fed in the same pass as
  a draft; the longest prefix the model's constrained argmax agrees with is kept, so the output is
  exactly greedy decoding, and the choice at the first disagreement (usually the span's key) comes
  from that same pass.

Every decision's log-probability is soft-maxed over the allowed ids only (:class:`Decision`); those
are the confidence features (:func:`router.lm_confidence.answer_features`).

A schema with both answer orders (:attr:`router.lm_grammar.RouteSchema.views`) decodes each request
once per view, the views side by side in the same passes; :func:`combine_views` keeps the likelier
complete answer and records whether the views agreed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.lm_grammar import Grammar, GrammarState, Request, RouteSchema

__all__ = ["Decision", "Result", "KVCache", "FastLlama", "FastGemma", "HFDecoder", "build_engine", "decode_batch", "combine_views",
           "bf16_packing_available", "fp32_packing_available", "linear_for", "WEIGHTS", "embed_scale", "max_steps_for", "take_forced"]


@dataclass
class Decision:
    """One step where the grammar allowed more than one id: what it decided (``label``, ``key``,
    ``eos``, ``first``, ``cont``), the chosen id, its log-probability over the allowed ids, how many
    were allowed, and the log-probability margin to the runner-up."""

    kind: str
    token: int
    logprob: float
    n_allowed: int
    margin: float


@dataclass
class Result:
    """A decoded answer: the JSON text (valid and of the route's shape whenever ``complete``), the
    object, its decisions, and counters. ``complete`` is False when the step budget ran out: such an
    answer must be escalated, never served. Where the schema has two views: ``views_agree`` (both
    complete with the same object) and the other view's decisions (``alt_decisions``); None and empty
    otherwise. Counters are the kept view's, but ``passes``, which counts the passes the request took."""

    text: str = ""
    obj: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    complete: bool = False
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ms: float = 0.0
    view: str = ""
    views_agree: bool | None = None
    alt_decisions: list[Decision] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# lean decoders
# --------------------------------------------------------------------------------------------
@functools.cache
def bf16_packing_available() -> bool:
    """Whether this CPU runs oneDNN's packed bf16 linear kernels (AMX / AVX512-BF16)."""
    import torch

    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except Exception:  # noqa: BLE001 - any failure means: use float32
        return False
    return _packing_works("bfloat16")


@functools.cache
def fp32_packing_available() -> bool:
    """Whether oneDNN's packed float32 linear runs here. It does wherever PyTorch is built with
    oneDNN (x86 wheels): packing once spares the per-call reordering of the weights that made a pass
    of 2-8 rows cost twice a 1-row pass on an AVX2 CPU; results are the same."""
    return _packing_works("float32")


def _packing_works(dtype: str) -> bool:
    import torch

    try:  # small integers: exact in bf16 too, so any difference is a broken kernel
        x = (torch.arange(32, dtype=torch.float32).reshape(2, 16) % 7) - 3
        w = (torch.arange(128, dtype=torch.float32).reshape(8, 16) % 5) - 2
        packed = _packed_linear(w, dtype)
        return bool(torch.allclose(packed(x), x @ w.t(), atol=1e-3))
    except Exception:  # noqa: BLE001 - any failure means: plain float32 layers
        return False


def _packed_linear(w: Any, dtype: str, batch_hint: int = 8) -> Any:
    import torch

    class PackedLinear(torch.nn.Module):
        """A bias-free linear layer, its weights pre-packed for oneDNN once (in ``dtype``: bf16 where
        the CPU has the kernels, else float32); float32 in and out."""

        def __init__(self) -> None:
            super().__init__()
            self.dtype = getattr(torch, dtype)
            self.w = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(self.dtype).contiguous(), batch_hint)

        def forward(self, x: Any) -> Any:
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.w, None, "none", [], "").float()

    return PackedLinear()


def _plain_linear(w: Any) -> Any:
    import torch

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.detach().float().contiguous().clone()
    return lin


def linear_for(weights: str) -> tuple[str, bool, Any]:
    """How the lean decoders build their linear layers for ``weights`` on this CPU:
    ``(numerics, packed, factory)``. ``bf16``: packed bf16 where its kernels exist, else as ``fp32``;
    ``fp32``: packed float32 where oneDNN runs, plain otherwise; ``fp32-plain``: plain float32 layers
    (the reference the packed ones are measured against)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown decoder weights {weights!r} (want one of {', '.join(WEIGHTS)})")
    if weights == "bf16" and bf16_packing_available():
        return "bf16", True, functools.partial(_packed_linear, dtype="bfloat16")
    if weights != "fp32-plain" and fp32_packing_available():
        return "fp32", True, functools.partial(_packed_linear, dtype="float32")
    return "fp32", False, _plain_linear


WEIGHTS = ("bf16", "fp32", "fp32-plain")


@dataclass
class KVCache:
    """One request's keys and values per layer, ``(n_kv, capacity, head_dim)``; ``len`` is the fill.
    Rolling back is setting ``len``."""

    k: list[Any]
    v: list[Any]
    capacity: int
    len: int = 0


def _rope(theta: float, dim: int, n: int) -> tuple[Any, Any]:
    import torch

    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    f = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    e = torch.cat([f, f], -1)
    return e.cos(), e.sin()


class _Lean:
    """What the lean decoders share: tables, caches, the batched forward's skeleton, the scores."""

    def __init__(self, model: Any, extra_in: Any, extra_out: Any, *, weights: str, max_positions: int = 4096):
        import torch

        cfg = model.config
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.cfg = cfg
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.d, self.eps, self.inter = cfg.hidden_size, cfg.rms_norm_eps, cfg.intermediate_size
        self.n_layers = cfg.num_hidden_layers
        self.max_positions = min(max_positions, int(getattr(cfg, "max_position_embeddings", max_positions) or max_positions))
        self.weights, self.packed, self._lin = linear_for(weights)
        with torch.no_grad():
            emb = body.embed_tokens.weight.detach().float()
            self.table_in = torch.cat([emb, extra_in.detach().float()], 0).contiguous()
            out = model.get_output_embeddings().weight.detach()
            if out.data_ptr() == body.embed_tokens.weight.data_ptr() and extra_out is extra_in:
                self.table_out = self.table_in
            else:
                self.table_out = torch.cat([out.float(), extra_out.detach().float()], 0).contiguous()
        self.embed_scale = 1.0
        self.layers: list[dict[str, Any]] = []

    def new_cache(self, length: int) -> KVCache:
        import torch

        if length > self.max_positions:
            raise ValueError(f"a request of {length} tokens is longer than this decoder's {self.max_positions}")
        return KVCache([torch.zeros(self.nkv, length, self.hd) for _ in range(self.n_layers)],
                       [torch.zeros(self.nkv, length, self.hd) for _ in range(self.n_layers)], length)

    def _fused(self, attn: Any, mlp: Any) -> dict[str, Any]:
        """A layer's projections packed for one matmul each: q, k and v together; gate and up together."""
        import torch

        return {
            "qkv": self._lin(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0)),
            "o": self._lin(attn.o_proj.weight),
            "gu": self._lin(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)),
            "down": self._lin(mlp.down_proj.weight),
        }

    def scores(self, h: Any, ids: Sequence[int]) -> Any:
        """Logits of one hidden state over ``ids`` (the gathered head)."""
        import torch

        return self.table_out[torch.tensor(list(ids))] @ h

    def _attend(self, q: Any, k: Any, v: Any, cache: KVCache, layer: int, window: int | None, scale: float | None) -> Any:
        import torch
        import torch.nn.functional as F

        n, p = q.shape[1], cache.len
        L = p + n
        K, V = cache.k[layer], cache.v[layer]
        K[:, p:L] = k
        V[:, p:L] = v
        mask = None
        if n > 1 or (window is not None and L > window):
            rows = torch.arange(p, L).unsqueeze(1)
            cols = torch.arange(L).unsqueeze(0)
            mask = cols <= rows
            if window is not None:
                mask = mask & (cols > rows - window)
        a = F.scaled_dot_product_attention(q.unsqueeze(0), K[:, :L].unsqueeze(0), V[:, :L].unsqueeze(0),
                                           attn_mask=mask, enable_gqa=True, scale=scale)
        return a[0].transpose(0, 1).reshape(n, self.nh * self.hd)

    def forward(self, feeds: Sequence[tuple[Sequence[int], KVCache]]) -> list[Any]:
        """Feed each ``(ids, cache)`` after its cache's content, all in one pass; returns each feed's
        final-norm hidden states ``(len(ids), d)``."""
        import torch

        with torch.inference_mode():
            sizes = [len(ids) for ids, _ in feeds]
            for (ids, cache), n in zip(feeds, sizes):
                if cache.len + n > cache.capacity:
                    raise ValueError("a decode ran past its KV cache")
            x = self.table_in[torch.tensor([t for ids, _ in feeds for t in ids])] * self.embed_scale
            x = self._layers(x, feeds, sizes)
            for (_, cache), n in zip(feeds, sizes):
                cache.len += n
            return list(torch.split(x, sizes))

    def _per_feed(self, fn: Any, q: Any, k: Any, v: Any, feeds: Sequence[tuple[Sequence[int], KVCache]], sizes: list[int]) -> Any:
        import torch

        outs, at = [], 0
        for (_, cache), n in zip(feeds, sizes):
            outs.append(fn(q[at:at + n], k[at:at + n], v[at:at + n], cache))
            at += n
        return torch.cat(outs, 0)

    def _layers(self, x: Any, feeds: Any, sizes: list[int]) -> Any:  # pragma: no cover - per layout
        raise NotImplementedError


class FastLlama(_Lean):
    """The Llama layout (SmolLM2 and the project's tiny test model)."""

    @classmethod
    def supports(cls, cfg: Any) -> bool:
        rope = getattr(cfg, "rope_parameters", None) or {}
        return (cfg.model_type == "llama" and getattr(cfg, "hidden_act", "silu") == "silu"
                and rope.get("rope_type", "default") == "default" and not getattr(cfg, "attention_bias", False)
                and not getattr(cfg, "mlp_bias", False))

    def __init__(self, model: Any, extra_in: Any, extra_out: Any, *, weights: str = "bf16"):
        import torch

        super().__init__(model, extra_in, extra_out, weights=weights)
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        theta = (getattr(self.cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(self.cfg, "rope_theta", 10000.0)
        self.cos, self.sin = _rope(float(theta), self.hd, self.max_positions)
        with torch.no_grad():
            for layer in body.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append({
                    **self._fused(a, m),
                    "n1": layer.input_layernorm.weight.detach().float().clone(),
                    "n2": layer.post_attention_layernorm.weight.detach().float().clone(),
                })
            self.norm = body.norm.weight.detach().float().clone()

    def _layers(self, x: Any, feeds: Any, sizes: list[int]) -> Any:
        import torch
        import torch.nn.functional as F

        nq, nk, hd, half = self.nh * self.hd, self.nkv * self.hd, self.hd, self.hd // 2
        for i, blk in enumerate(self.layers):
            h = F.rms_norm(x, (self.d,), blk["n1"], self.eps)
            qkv = blk["qkv"](h)

            def attend(q: Any, k: Any, v: Any, cache: KVCache, i: int = i) -> Any:
                n, p = q.shape[0], cache.len
                cos, sin = self.cos[p:p + n], self.sin[p:p + n]
                q = q.view(n, self.nh, hd).transpose(0, 1)
                k = k.view(n, self.nkv, hd).transpose(0, 1)
                v = v.view(n, self.nkv, hd).transpose(0, 1)
                q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
                k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
                return self._attend(q, k, v, cache, i, None, None)

            a = self._per_feed(attend, qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:], feeds, sizes)
            x = x + blk["o"](a)
            h = F.rms_norm(x, (self.d,), blk["n2"], self.eps)
            gu = blk["gu"](h)
            x = x + blk["down"](F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        return F.rms_norm(x, (self.d,), self.norm, self.eps)


class FastGemma(_Lean):
    """The Gemma 3 text layout: (1 + w) RMSNorms before and after attention and MLP, per-head q/k norms,
    GELU-tanh MLP, sqrt(d)-scaled input embeddings, local (sliding-window) and global RoPE bases."""

    @classmethod
    def supports(cls, cfg: Any) -> bool:
        rope = getattr(cfg, "rope_parameters", None) or {}
        return (cfg.model_type == "gemma3_text" and getattr(cfg, "hidden_activation", "") == "gelu_pytorch_tanh"
                and not getattr(cfg, "attn_logit_softcapping", None) and not getattr(cfg, "final_logit_softcapping", None)
                and all(p.get("rope_type", "default") == "default" for p in rope.values()))

    def __init__(self, model: Any, extra_in: Any, extra_out: Any, *, weights: str = "bf16"):
        import torch

        super().__init__(model, extra_in, extra_out, weights=weights)
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.scale_q = float(self.cfg.query_pre_attn_scalar) ** -0.5
        self.embed_scale = float(self.cfg.hidden_size) ** 0.5
        self.window = int(self.cfg.sliding_window)
        self.kinds = list(self.cfg.layer_types)
        self.rope = {kind: _rope(float(p["rope_theta"]), self.hd, self.max_positions)
                     for kind, p in self.cfg.rope_parameters.items()}

        def one(w: Any) -> Any:
            return (1.0 + w.detach().float()).clone()

        with torch.no_grad():
            for layer in body.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append({
                    **self._fused(a, m),
                    "n_in": one(layer.input_layernorm.weight), "n_post_attn": one(layer.post_attention_layernorm.weight),
                    "n_pre_ff": one(layer.pre_feedforward_layernorm.weight),
                    "n_post_ff": one(layer.post_feedforward_layernorm.weight),
                    "n_q": one(a.q_norm.weight), "n_k": one(a.k_norm.weight),
                })
            self.norm = one(body.norm.weight)

    def _layers(self, x: Any, feeds: Any, sizes: list[int]) -> Any:
        import torch
        import torch.nn.functional as F

        nq, nk, hd, half, d = self.nh * self.hd, self.nkv * self.hd, self.hd, self.hd // 2, self.d
        for i, blk in enumerate(self.layers):
            cos_t, sin_t = self.rope[self.kinds[i]]
            window = self.window if self.kinds[i] == "sliding_attention" else None
            h = F.rms_norm(x, (d,), blk["n_in"], self.eps)
            qkv = blk["qkv"](h)

            def attend(q: Any, k: Any, v: Any, cache: KVCache, i: int = i, cos_t: Any = cos_t, sin_t: Any = sin_t,
                       window: int | None = window, blk: dict = blk) -> Any:
                n, p = q.shape[0], cache.len
                cos, sin = cos_t[p:p + n], sin_t[p:p + n]
                q = F.rms_norm(q.reshape(n, self.nh, hd), (hd,), blk["n_q"], self.eps).transpose(0, 1)
                k = F.rms_norm(k.reshape(n, self.nkv, hd), (hd,), blk["n_k"], self.eps).transpose(0, 1)
                v = v.reshape(n, self.nkv, hd).transpose(0, 1)
                q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
                k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
                return self._attend(q, k, v, cache, i, window, self.scale_q)

            a = self._per_feed(attend, qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:], feeds, sizes)
            x = x + F.rms_norm(blk["o"](a), (d,), blk["n_post_attn"], self.eps)
            h = F.rms_norm(x, (d,), blk["n_pre_ff"], self.eps)
            gu = blk["gu"](h)
            h = blk["down"](F.gelu(gu[:, :self.inter], approximate="tanh") * gu[:, self.inter:])
            x = x + F.rms_norm(h, (d,), blk["n_post_ff"], self.eps)
        return F.rms_norm(x, (d,), self.norm, self.eps)


class HFDecoder:
    """The decoders' interface over any Hugging Face causal LM (a ``DynamicCache`` per request,
    cropped back on rollback); feeds run one after another. Used for other layouts and on CUDA."""

    weights = "hf"
    packed = False

    def __init__(self, model: Any, extra_in: Any, extra_out: Any, *, device: str = "cpu"):
        import torch

        self.model = model.eval()
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.device = device
        dtype = next(model.parameters()).dtype
        self.V = self.body.embed_tokens.weight.shape[0]
        self.scale = embed_scale(self.body)
        self.extra_in = extra_in.detach().to(device, dtype)
        out = model.get_output_embeddings().weight.detach()
        self.table_out_base = out
        self.extra_out = extra_out.detach().to(device, torch.float32)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)

    def new_cache(self, length: int) -> Any:
        from transformers import DynamicCache

        return KVCache([DynamicCache(config=self.model.config)], [], length)

    def forward(self, feeds: Sequence[tuple[Sequence[int], KVCache]]) -> list[Any]:
        import torch

        out = []
        with torch.inference_mode():
            for ids, cache in feeds:
                kv = cache.k[0]
                surplus = kv.get_seq_length() - cache.len
                if surplus > 0:
                    kv.crop(-surplus)  # sliding-window layers take only "drop the last n"
                t = torch.tensor(list(ids), device=self.device)
                base = self.body.embed_tokens(t.clamp(max=self.V - 1))
                extra = (self.extra_in[(t - self.V).clamp(min=0)] * self.scale).to(base.dtype)
                emb = torch.where((t >= self.V).unsqueeze(-1), extra, base).unsqueeze(0)
                pos = torch.arange(cache.len, cache.len + len(ids), device=self.device).unsqueeze(0)
                hidden = self.body(inputs_embeds=emb, past_key_values=kv, use_cache=True, position_ids=pos).last_hidden_state
                cache.len += len(ids)
                out.append(hidden[0].float())
        return out

    def scores(self, h: Any, ids: Sequence[int]) -> Any:
        import torch

        t = torch.tensor(list(ids), device=self.device)
        rows = torch.where((t >= self.V).unsqueeze(-1), self.extra_out[(t - self.V).clamp(min=0)],
                           self.table_out_base[t.clamp(max=self.V - 1)].float())
        return rows @ h


def embed_scale(body: Any) -> float:
    """How much the base scales its input embeddings (Gemma: sqrt(d)); extra tokens get the same."""
    return float(getattr(body.embed_tokens, "scalar_embed_scale", 1.0))


def build_engine(model: Any, extra_in: Any, extra_out: Any, *, device: str = "cpu", weights: str = "bf16",
                 decoder: str = "lean") -> Any:
    """The fastest decoder for ``model`` (merged weights) on ``device``: a lean one for the Llama and
    Gemma 3 layouts on CPU, :class:`HFDecoder` otherwise or where ``decoder`` is ``hf``. ``weights``:
    see :func:`linear_for`."""
    if decoder not in ("lean", "hf"):
        raise ValueError(f"unknown decoder {decoder!r} (want 'lean' or 'hf')")
    if device == "cpu" and decoder == "lean":
        for lean in (FastLlama, FastGemma):
            if lean.supports(model.config):
                return lean(model, extra_in, extra_out, weights=weights)
    return HFDecoder(model, extra_in, extra_out, device=device)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    grammar: Grammar
    state: GrammarState
    cache: Any
    pending: list[int]
    max_steps: int
    result: Result
    steps: int = 0
    allowed: list[int] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)
    base: int = 0


def max_steps_for(schema: RouteSchema, req: Request) -> int:
    """The token budget of one decode, forced tokens included: enough for every request token to be
    copied and keyed (key first: keyed and ended). A decode that reaches it ends unfinished (an
    escalation)."""
    per_token = 3 if schema.end_id is not None else 2  # key first writes a key and an end per span
    return per_token * len(req.ids) + len(schema.keys) + 8


def take_forced(grammar: Grammar, st: GrammarState, out: list[int], room: int) -> tuple[list[int], int]:
    """Append to ``out`` the ids the grammar forces (one allowed id), at most ``room`` of them; returns
    what is allowed next and how many were taken. Forced tokens are written like any other, so they
    count against the budget: an undertrained student copying the request over and over is mostly
    forced tokens."""
    allowed, taken = grammar.allowed(st), 0
    while len(allowed) == 1 and st.phase != "done" and taken < room:
        out.append(allowed[0])
        grammar.advance(st, allowed[0])
        taken += 1
        allowed = grammar.allowed(st)
    return allowed, taken


def combine_views(results: Sequence[Result]) -> Result:
    """One request's answer from its views' decodes: the complete one with the highest summed
    log-probability of its decisions (the first view on a tie; the first view when none is complete),
    with ``views_agree`` and the other view's decisions. A single view is returned as it is."""
    if len(results) == 1:
        return results[0]
    done = [r for r in results if r.complete]
    best = max(done, key=lambda r: sum(d.logprob for d in r.decisions)) if done else results[0]
    other = next(r for r in results if r is not best)
    best.views_agree = len(done) == len(results) and all(r.obj == best.obj for r in done)
    best.alt_decisions = other.decisions
    best.passes = max(r.passes for r in results)
    return best


def decode_batch(engine: Any, schema: RouteSchema, requests: Sequence[Request], *, max_draft: int = 4) -> list[Result]:
    """Greedy constrained decoding of ``requests`` in lockstep, each in every view of the schema
    (see the module docstring); one :class:`Result` per request."""
    import torch

    t0 = time.perf_counter()
    runs = []
    for req in requests:
        budget = max_steps_for(schema, req)
        for view in schema.views:
            prompt = schema.prompt(req, view)
            run = _Run(Grammar(schema, req, view), GrammarState(), engine.new_cache(len(prompt) + budget + max_draft + 2),
                       prompt, budget, Result(prompt_tokens=len(prompt), view=view))
            runs.append(run)
    active = list(runs)
    while active:
        feeds = []
        for run in active:
            g, st = run.grammar, run.state
            allowed, taken = take_forced(g, st, run.pending, run.max_steps - run.steps)
            run.steps += taken
            run.result.completion_tokens += taken
            if st.phase == "done" or run.steps >= run.max_steps:
                continue
            run.allowed = allowed
            # a pass writes its accepted draft and one more token: all within the budget
            room = min(max_draft, run.max_steps - run.steps - 1)
            run.draft = g.draft(st, room) if room > 0 else []
            run.base = run.cache.len
            feeds.append(run)
        if not feeds:
            break
        hidden = engine.forward([(run.pending + run.draft, run.cache) for run in feeds])
        for run, h in zip(feeds, hidden):
            g, st, res = run.grammar, run.state, run.result
            res.passes += 1
            res.drafted += len(run.draft)
            j = len(run.pending) - 1
            nxt: list[int] = []
            for k in range(len(run.draft) + 1):
                allowed = run.allowed if k == 0 else g.allowed(st)
                if len(allowed) == 1:
                    choice = allowed[0]
                else:
                    lp = torch.log_softmax(engine.scores(h[j + k], allowed).float(), 0)
                    top = torch.topk(lp, 2)
                    choice = allowed[int(top.indices[0])]
                    res.decisions.append(Decision(g.kind(st, choice), choice, float(top.values[0]), len(allowed),
                                                  float(top.values[0] - top.values[1])))
                g.advance(st, choice)
                run.steps += 1
                res.completion_tokens += 1
                if k < len(run.draft) and choice == run.draft[k]:
                    res.accepted += 1
                    if st.phase == "done":
                        break
                    continue
                nxt = [choice] if st.phase != "done" else []
                run.cache.len = run.base + len(run.pending) + k  # drop the draft tokens after the disagreement
                break
            run.pending = nxt
        active = [run for run in feeds if run.state.phase != "done"]
    ms = (time.perf_counter() - t0) * 1000
    for run in runs:
        res = run.result
        res.complete = run.state.phase == "done"
        res.obj = run.grammar.to_obj(run.state)
        res.text = run.grammar.to_json(run.state)
        res.ms = ms
    n = len(schema.views)
    return [combine_views([run.result for run in runs[i:i + n]]) for i in range(0, len(runs), n)]
