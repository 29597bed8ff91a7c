"""A STAND-IN for vLLM's OpenAI-compatible server (no GPU inference server is reachable here).

It speaks the documented parts of vLLM's HTTP API that kdgate uses, as a real HTTP server on
127.0.0.1 (a raw ASGI app on :class:`bench.asgi.StandinApp`, served by uvicorn in a thread):

- ``GET /v1/models``: the base model and every loaded adapter (``parent`` = the base);
- ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (only when runtime LoRA updating
  is enabled, as with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; otherwise the routes do not exist and
  the answer is vLLM's (FastAPI's) 404 ``{"detail": "Not Found"}``), with vLLM's answers: 200 text ``Success: ...``;
  400 ``InvalidUserInput`` for a missing field or a duplicate name; 404 ``NotFoundError`` for an
  unknown adapter or a path with no adapter;
- ``POST /v1/completions`` with a token-id prompt: greedy steps with ``allowed_token_ids``, ``logprobs``
  in the server's ``--logprobs-mode`` and ``return_tokens_as_token_ids`` (the parts kdgate's structured
  driver uses), the adapter applied unmerged through PEFT as vLLM applies LoRA;
- ``POST /v1/chat/completions``: generation with the embedded runtime (:class:`router.lm_student.LMEngine`,
  base model + the adapter merged) with OpenAI logprobs; 404 ``NotFoundError`` for an unknown model.

Error bodies follow ``error_format``: ``"envelope"`` (recent vLLM: ``{"error": {...}}``) or
``"legacy"`` (older vLLM: ``{"object": "error", "message", "type", "param", "code"}``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.asgi import Request, Send, StandinApp, send_json, send_text

__all__ = ["VLLMStandin", "create_vllm_standin"]

# (status, body): a str is sent as text (vLLM's "Success: ..." answers), anything else as JSON
Reply = tuple[int, Any]
NOT_FOUND: Reply = (404, {"detail": "Not Found"})  # FastAPI's answer for a route vLLM does not have


class VLLMStandin(StandinApp):
    """The stand-in app and its state: the base model path and the adapters loaded at runtime."""

    def __init__(self, base_model: str, *, served_model_name: str | None = None, error_format: str = "envelope",
                 runtime_lora_updating: bool = True, logprobs_mode: str = "raw_logprobs"):
        self.base_model = base_model
        self.logprobs_mode = logprobs_mode
        self.served_model_name = served_model_name or base_model
        self.error_format = error_format
        self.runtime_lora_updating = runtime_lora_updating
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> {"path", "engine", "id"}
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # chat bodies received (tests inspect them)
        self._counter = 0

    async def handle(self, request: Request, send: Send) -> None:
        try:
            body = request.json() if request.method == "POST" else {}
        except orjson.JSONDecodeError:
            body = None
        route = (request.method, request.path)
        if route == ("GET", "/v1/models"):
            reply = (200, self.models())
        elif body is None:
            reply = self.error("The request body is not JSON.", "BadRequestError", 400)
        elif route == ("POST", "/v1/chat/completions"):
            reply = await asyncio.to_thread(self.chat, body)
        elif route == ("POST", "/v1/completions"):
            reply = await asyncio.to_thread(self.complete, body)
        elif route == ("POST", "/v1/load_lora_adapter") and self.runtime_lora_updating:
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                reply = self.error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
            else:
                reply = await asyncio.to_thread(self.load, name, path)
        elif route == ("POST", "/v1/unload_lora_adapter") and self.runtime_lora_updating:
            if not body.get("lora_name") and not body.get("lora_int_id"):
                reply = self.error("either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput", 400)
            else:
                reply = self.unload(body.get("lora_name"))
        else:
            reply = NOT_FOUND
        status, value = reply
        if isinstance(value, str):
            await send_text(send, status, value)
        else:
            await send_json(send, status, value)

    def error(self, message: str, err_type: str, status: int) -> Reply:
        info = {"message": message, "type": err_type, "param": None, "code": status}
        return status, ({"error": info} if self.error_format == "envelope" else {"object": "error", **info})

    def models(self) -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": self.served_model_name, "object": "model", "created": now, "owned_by": "vllm", "root": self.base_model, "parent": None}]
        with self.lock:
            for name, entry in self.adapters.items():
                data.append({"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": entry["path"], "parent": self.served_model_name})
        return {"object": "list", "data": data}

    def load(self, name: str, path: str) -> Reply:
        from router.lm_student import LMEngine

        with self.lock:
            if name in self.adapters:
                return self.error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
        adapter_dir = Path(path)
        if not (adapter_dir / "adapter_config.json").is_file():
            # vLLM's engine raises "Loading lora N failed: No adapter found for P", served as 404
            return self.error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        # vLLM validates the adapter when it loads it; the stand-in reads it as a PEFT model: merged for
        # chat (LMEngine), unmerged for token-level completions (a head delta on a tied table stays its own)
        if self.adapter_format(adapter_dir) == "structured":
            engine = None
        else:
            engine = LMEngine.from_parts(base_model=self.base_model, adapter_dir=adapter_dir, tokenizer_dir=self.base_model,
                                         device="cpu")
        with self.lock:
            if name in self.adapters:  # a concurrent load won the race
                return self.error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
            self._counter += 1
            self.adapters[name] = {"path": path, "engine": engine, "id": self._counter}
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    @staticmethod
    def adapter_format(adapter_dir: Path) -> str:
        """``structured`` for an adapter with embedding / head LoRA (an exported structured student)."""
        import json

        targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules") or []
        return "structured" if "embed_tokens" in targets else "lm"

    def _peft(self, entry: dict[str, Any]) -> Any:
        with self.lock:
            if entry.get("peft") is None:
                import torch
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=torch.float32)
                entry["peft"] = PeftModel.from_pretrained(base, entry["path"]).eval()
            return entry["peft"]

    def complete(self, body: dict[str, Any]) -> Reply:
        """``/v1/completions`` with a token-id prompt, as kdgate's structured driver calls it: greedy,
        ``allowed_token_ids`` applied as a logits processor, ``logprobs`` top entries per token in the
        server's ``logprobs_mode`` (``raw_logprobs``, vLLM's default: before the mask;
        ``processed_logprobs``: after it), tokens as ``token_id:N`` with ``return_tokens_as_token_ids``."""
        import torch

        model, entry = self.addressed(body)
        if entry is None:
            return self.error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
            return self.error("The stand-in takes token-id prompts only.", "BadRequestError", 400)
        if float(body.get("temperature") or 0.0) != 0.0:
            return self.error("The stand-in decodes greedily only.", "BadRequestError", 400)
        peft = self._peft(entry)
        vocab = peft.get_output_embeddings().weight.shape[0]
        allowed = body.get("allowed_token_ids")
        if allowed is not None and (not allowed or any(not 0 <= int(i) < vocab for i in allowed)):
            return self.error("allowed_token_ids contains out-of-vocab token id", "BadRequestError", 400)
        k = int(body.get("logprobs") or 0)
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        ids, tokens, token_lps, tops = list(prompt), [], [], []
        for _ in range(int(body.get("max_tokens") or 16)):
            with torch.inference_mode():
                logits = peft(torch.tensor([ids])).logits[0, -1].float()
            raw = torch.log_softmax(logits, -1)
            if allowed is not None:
                mask = torch.full_like(logits, float("-inf"))
                mask[torch.tensor(allowed)] = 0.0
                logits = logits + mask
            processed = torch.log_softmax(logits, -1)
            chosen = int(logits.argmax())
            shown = processed if self.logprobs_mode == "processed_logprobs" else raw
            name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: str(t))
            tokens.append(name(chosen))
            token_lps.append(float(shown[chosen]))
            top = torch.topk(shown, k) if k else None
            tops.append({name(int(i)): float(v) for v, i in zip(top.values, top.indices)} | {name(chosen): float(shown[chosen])}
                        if top is not None else None)
            ids.append(chosen)
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "stop_reason": None,
                         "logprobs": {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                                      "text_offset": [0] * len(tokens)} if k else None}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens), "total_tokens": len(prompt) + len(tokens)},
        }

    def unload(self, name: str) -> Reply:
        with self.lock:
            if name not in self.adapters:
                return self.error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del self.adapters[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def addressed(self, body: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
        """Record a generation request; the adapter it names (``model``) and its entry, if loaded."""
        self.requests.append(body)
        model = body.get("model")
        with self.lock:
            return model, self.adapters.get(model)

    def chat(self, body: dict[str, Any]) -> Reply:
        model, entry = self.addressed(body)
        if entry is None:
            return self.error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        messages = body.get("messages") or []
        if not messages:
            return self.error("messages must not be empty", "BadRequestError", 400)
        want_logprobs = bool(body.get("logprobs"))
        top = int(body.get("top_logprobs") or 0)
        if entry["engine"] is None:
            return self.error("The stand-in serves exported structured adapters through /v1/completions only.",
                              "BadRequestError", 400)
        gen = entry["engine"].generate(
            [messages],
            max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or 64),
            temperature=float(body.get("temperature") if body.get("temperature") is not None else 1.0),
            top_p=float(body.get("top_p") or 1.0),
            top_logprobs=top if want_logprobs else 0,
            seed=body.get("seed"),
        )[0]
        from router.lm_student import apply_stop

        gen = apply_stop(gen, body.get("stop"))
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text, "tool_calls": []},
                    "logprobs": {"content": gen.logprobs} if want_logprobs else None,
                    "finish_reason": gen.finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            },
        }


def create_vllm_standin(
    base_model: str,
    *,
    served_model_name: str | None = None,
    error_format: str = "envelope",
    runtime_lora_updating: bool = True,
    logprobs_mode: str = "raw_logprobs",
) -> tuple[VLLMStandin, VLLMStandin]:
    """The stand-in app and its state (one object). ``runtime_lora_updating=False`` omits the adapter
    routes; ``logprobs_mode`` is vLLM's ``--logprobs-mode`` (default ``raw_logprobs``, as vLLM's)."""
    state = VLLMStandin(base_model, served_model_name=served_model_name, error_format=error_format,
                        runtime_lora_updating=runtime_lora_updating, logprobs_mode=logprobs_mode)
    return state, state
