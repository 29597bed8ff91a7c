"""Structured LM students served by vLLM: the grammar driven from the gateway, one decision per call.

The distiller exports every structured student as a plain LoRA adapter (``vllm-adapter/``,
:mod:`distiller.lm.vllm_export`): its keys, enum values and end live on base ids it repurposes
(``manifest["vllm"]["token_ids"]``), so vLLM serves it as any runtime LoRA. vLLM cannot run the
route's grammar (it copies spans of *this* request, in order, each key once), so the gateway runs it
(:class:`router.lm_grammar.Grammar`, the very rules the in-process decoder uses) and asks vLLM only
at the steps where the grammar allows more than one id::

    POST /v1/completions {"model": ADAPTER, "prompt": [ids so far], "max_tokens": 1, "temperature": 0,
                          "allowed_token_ids": [the grammar's ids], "logprobs": 2,
                          "return_tokens_as_token_ids": true}

Forced steps are appended without a call, and with prefix caching (vLLM's default) each call
prefills only the ids since the last. vLLM must run with ``--logprobs-mode processed_logprobs``: then
the returned log-probabilities are soft-maxed over the allowed ids, exactly the decisions the
in-process decoder records (:class:`router.lm_decode.Decision`), and the artifact's calibrator scores
them unchanged (:func:`router.lm_structured.confidence_of`). A reply whose log-probabilities are not
over the allowed ids (the default ``raw_logprobs``) is refused with that advice, so the request
escalates rather than being served with a miscalibrated confidence.

The answer is greedy decoding under the grammar, the same as in-process: valid JSON of the route's
shape, or unfinished and escalated. A request holding one of the repurposed ids would feed vLLM a
row the student changed; it escalates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx

from gateway.vllm_backend import (
    VLLMBadRequest,
    VLLMClient,
    VLLMUnavailable,
    _raise_for,
    adapter_name,
    base_url_of,
    ensure_adapter,
    shut_down,
)
from router.lm_confidence import Calibrator
from router.lm_decode import Decision, Result, combine_views, max_steps_for, take_forced
from router.lm_grammar import Grammar, GrammarState, Request, RouteSchema
from router.lm_structured import KIND, confidence_of, register_backend
from router.student import StudentError, StudentOutput
from router.template import Template

__all__ = ["VLLMStructuredStudent", "parse_choice"]

log = logging.getLogger(__name__)

LOGPROBS_ADVICE = "start vLLM with --logprobs-mode processed_logprobs"


def parse_choice(body: dict[str, Any], allowed: list[int]) -> tuple[int, float, float]:
    """The chosen id, its log-probability and the runner-up's from a ``/v1/completions`` reply with
    ``return_tokens_as_token_ids``; refuses log-probabilities that are not over ``allowed``."""
    try:
        lp = body["choices"][0]["logprobs"]
        chosen = _token_id(lp["tokens"][0])
        top = {_token_id(t): float(v) for t, v in (lp["top_logprobs"][0] or {}).items()}
        chosen_lp = float(lp["token_logprobs"][0])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise VLLMBadRequest(f"vLLM answered a constrained step with an unexpected body: {exc!r}") from exc
    allowed_set = set(allowed)
    if chosen not in allowed_set:
        raise VLLMBadRequest(f"vLLM chose id {chosen}, which allowed_token_ids excluded.")
    if any(t not in allowed_set for t in top):
        raise VLLMBadRequest(f"vLLM's logprobs are over its whole vocabulary, not the allowed ids: {LOGPROBS_ADVICE}.")
    others = [v for t, v in top.items() if t != chosen]
    if not others:
        raise VLLMBadRequest("vLLM returned no runner-up logprob; ask for logprobs >= 2.")
    return chosen, chosen_lp, max(others)


def _token_id(token: str) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ValueError(f"token {token!r} is not 'token_id:N' (return_tokens_as_token_ids)")
    return int(token.split(":", 1)[1])


class VLLMStructuredStudent:
    """A structured student whose model runs in vLLM (its exported adapter) and whose grammar runs here."""

    kind = KIND
    answer_format = "json"

    def __init__(self, directory: Path, manifest: dict[str, Any], *, base_url: str, api_key: str | None = None,
                 timeout: float = 60.0, unload_on_close: bool = True, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None):
        from transformers import AutoTokenizer

        export = manifest.get("vllm") or {}
        if manifest.get("weights") != "adapter" or not export.get("token_ids"):
            raise StudentError(
                f"The structured student in {directory} has no vLLM export (full weights, or trained before "
                "exports or with vllm_export off); serve it with student_backend = embedded or retrain the route.")
        self.directory = Path(directory)
        self.manifest = manifest
        self.route = str(manifest.get("route", ""))
        self.version = int(manifest.get("version", 0))
        self.schema = RouteSchema.from_dict(json.loads((self.directory / "schema.json").read_text()))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory / "tokenizer"))
        self.template = Template.from_dict(manifest.get("template"))
        calibration = manifest.get("calibration")
        self.calibrator = Calibrator.from_json(calibration) if calibration else None
        self.max_input_tokens = int((manifest.get("decoding") or {}).get("max_input_tokens", 512))
        v = self.schema.base_vocab
        self.to_served = {v + j: int(t) for j, t in enumerate(export["token_ids"])}
        self.from_served = {t: i for i, t in self.to_served.items()}
        self.adapter = adapter_name(self.route, self.version)
        self.lora_path = str(self.directory / export.get("adapter", "vllm-adapter"))
        self.unload_on_close = unload_on_close
        self.client = VLLMClient(base_url, api_key=api_key, timeout=timeout, transport=async_transport)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sync = httpx.Client(base_url=self.client.base_url, headers=headers, timeout=timeout, transport=transport)
        ensure_adapter(self._sync, self.adapter, self.lora_path)

    # -- decoding ----------------------------------------------------------------------------------
    def _request(self, messages: list[dict[str, Any]]) -> Request:
        try:
            text = self.template.strip(messages)
            req = Request.make(self.tokenizer, text)
        except Exception as exc:  # noqa: BLE001 - a request the student cannot read escalates
            raise StudentError(f"The structured LM student cannot read this request: {exc}") from exc
        if len(req.ids) > self.max_input_tokens:
            raise StudentError(f"The request is {len(req.ids)} tokens long; this student reads at most "
                               f"{self.max_input_tokens}.")
        if any(i in self.from_served for i in req.ids):
            raise StudentError("The request holds a token id the student's vLLM adapter repurposes for its grammar.")
        return req

    def _steps(self, req: Request) -> Generator[dict[str, Any], dict[str, Any], Result]:
        """Greedy decoding under the grammar in each of the schema's views, one after another (a
        student of both orders answers twice, as in-process): yields each decision's completion body,
        is sent vLLM's reply, returns the answer (:func:`router.lm_decode.combine_views`)."""
        results = []
        for view in self.schema.views:
            results.append((yield from self._view_steps(req, view)))
        return combine_views(results)

    def _view_steps(self, req: Request, view: str) -> Generator[dict[str, Any], dict[str, Any], Result]:
        s = self.schema
        g, st = Grammar(s, req, view), GrammarState()
        fed = s.prompt(req, view)
        res = Result(prompt_tokens=len(fed), view=view)
        budget, steps, t0 = max_steps_for(s, req), 0, time.perf_counter()
        while True:
            allowed, taken = take_forced(g, st, fed, budget - steps)  # forced: appended, not asked
            steps += taken
            res.completion_tokens += taken
            if st.phase == "done" or steps >= budget:
                break
            served = [self.to_served.get(i, i) for i in allowed]
            reply = yield {"model": self.adapter, "prompt": [self.to_served.get(i, i) for i in fed], "max_tokens": 1,
                           "temperature": 0.0, "allowed_token_ids": served, "logprobs": 2,
                           "return_tokens_as_token_ids": True, "skip_special_tokens": False}
            chosen, lp, runner_up = parse_choice(reply, served)
            choice = self.from_served.get(chosen, chosen)
            res.decisions.append(Decision(g.kind(st, choice), choice, lp, len(allowed), lp - runner_up))
            fed.append(choice)
            g.advance(st, choice)
            steps += 1
            res.passes += 1
            res.completion_tokens += 1
        res.complete = st.phase == "done"
        res.obj, res.text = g.to_obj(st), g.to_json(st)
        res.ms = (time.perf_counter() - t0) * 1000
        return res

    def _output(self, res: Result) -> StudentOutput:
        if not res.complete:
            raise StudentError(f"The structured LM student did not finish its answer within {len(res.decisions)} "
                               "decisions; an unfinished answer is never served.")
        conf = float(confidence_of(self.calibrator, [res])[0])
        return StudentOutput(text=res.text, confidence=conf, version=self.version, prompt_tokens=res.prompt_tokens,
                             completion_tokens=res.completion_tokens,
                             extra={"backend": "vllm", "model": self.adapter, "decisions": len(res.decisions),
                                    "calls": len(res.decisions) + len(res.alt_decisions), "views_agree": res.views_agree,
                                    "passes": res.passes, "decode_ms": round(res.ms, 2)})

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any] | None = None) -> StudentOutput:
        """Blocking: one vLLM call per decision."""
        steps = self._steps(self._request(messages))
        try:
            body = next(steps)
            while True:
                try:
                    response = self._sync.post("/v1/completions", json=body)
                except httpx.TransportError as exc:
                    raise VLLMUnavailable(f"vLLM at {self.client.base_url} is unreachable: {exc!r}") from exc
                _raise_for(response, "generate with", self.adapter)
                body = steps.send(response.json())
        except StopIteration as done:
            return self._output(done.value)

    async def apredict(self, messages: list[dict[str, Any]], params: dict[str, Any] | None = None) -> StudentOutput:
        """The event loop's path: the same steps over the async client."""
        steps = self._steps(self._request(messages))
        try:
            body = next(steps)
            while True:
                body = steps.send(await self.client.complete(body))
        except StopIteration as done:
            return self._output(done.value)

    def close(self) -> None:
        """Unload the adapter (a retired version) and close the connections."""
        shut_down(self._sync, self.client, self.adapter if self.unload_on_close else None)


def _factory(directory: Path, manifest: dict[str, Any], **options: Any) -> VLLMStructuredStudent:
    return VLLMStructuredStudent(directory, manifest, base_url=base_url_of(options), api_key=options.get("vllm_api_key"),
                                 timeout=float(options.get("vllm_timeout_s", 60.0)))


register_backend("vllm", _factory)
