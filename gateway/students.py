"""Students in the gateway: loading live versions, asking them first, shadow checks, drift, savings.

``StudentRouter.try_student`` is the hook :class:`gateway.serving.ChatService` calls before the
teacher. It returns a reply when the student answers, or escalates through
``ChatService.teacher_chat`` (so an escalation is logged as a teacher pair: the hardest examples are
the next version's training data). Any failure of the router or the student escalates with a warning;
it never becomes an error for the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.auth import Principal
from gateway.money import Money, TokenRatios, Usage, estimate_tokens, format_usd, saved
from gateway.errors import GatewayError
from store import Ledger, LedgerWriter
from gateway.routing import Route, RouteTable, message_text
from gateway.serving import ChatService, Reply, _logged_request
from gateway.settings import Settings
from router.agreement import agreement_kind, answers_agree
from router.route_policy import LiveVersion, ModeChange, RoutePolicy

log = logging.getLogger(__name__)

__all__ = ["StudentRouter", "LiveStudent"]

REGISTRY_POLL_S = 2.0
# Labelled requests kept per route (teacher answers of shadow-mode requests, escalations and
# checks), so a new version is scored on those it never trained on as soon as it loads.
CARRY_REQUESTS = 2000


@dataclass
class LiveStudent:
    route: str
    version: int
    kind: str
    checksum: str
    student: Any
    metrics: dict[str, Any]
    curve: list[dict[str, float]]
    val_pairs: int | None = None
    # tokens per character of the route's teacher traffic, to price what the teacher would have charged
    ratios: TokenRatios = field(default_factory=TokenRatios)
    batcher: "_Batcher | None" = None
    agreement: str = "label"  # how its answers are compared with the teacher's (router.agreement)

    def agrees(self, student: str | None, teacher: str | None) -> bool:
        """The project's one definition of agreement, for this student's kind of answer."""
        return answers_agree(self.agreement, student, teacher)


class _Batcher:
    """Gathers concurrent requests for one student into ``predict_batch`` calls (off the loop)."""

    def __init__(self, student: Any, *, max_batch: int = 32, max_wait_s: float = 0.002):
        self.student = student
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[list[dict[str, Any]], asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def predict(self, messages: list[dict[str, Any]]) -> Any:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, fut))
        return await fut

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                outs = await asyncio.to_thread(self.student.predict_batch, [m for m, _ in batch])
                for (_, fut), out in zip(batch, outs):
                    if not fut.done():
                        fut.set_result(out)
            except Exception as exc:  # every waiter escalates
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)


class StudentRouter:
    def __init__(
        self,
        *,
        settings: Settings,
        ledger: Ledger,
        writer: LedgerWriter,
        routes: RouteTable,
        chat: ChatService,
        money: Money,
        metrics: Any = None,
    ):
        self.settings = settings
        self.ledger = ledger
        self.writer = writer
        self.routes = routes
        self.chat = chat
        self.money = money
        self.metrics = metrics
        self.live: dict[str, LiveStudent] = {}
        self.policies: dict[str, RoutePolicy] = {}
        self.load_errors: dict[str, str] = {}
        self._poll_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._shadow_slots = asyncio.Semaphore(16)
        self._seen: dict[str, tuple[int, str]] = {}
        self._labelled: dict[str, deque[tuple[float, list[dict[str, Any]], str]]] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        for task in list(self._background):
            task.cancel()
        for live in self.live.values():
            if live.batcher is not None:
                await live.batcher.close()
            try:
                live.student.close()
            except Exception:
                pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            try:
                await self.refresh()
            except Exception:
                log.exception("student registry refresh failed; serving continues with the loaded versions")

    async def refresh(self) -> None:
        """Load newly promoted versions (hot swap); the old version serves until the new one is ready."""
        rows = await asyncio.to_thread(self.ledger.live_students)
        wanted = {r["route"]: r for r in rows}
        for route_name, row in wanted.items():
            key = (row["version"], row["checksum"])
            if self._seen.get(route_name) == key:
                continue
            self._seen[route_name] = key
            try:
                live = await asyncio.to_thread(self._load, row)
            except Exception as exc:
                # a version that fails to load leaves the previous one live
                self.load_errors[route_name] = f"version {row['version']}: {exc}"
                log.warning("route %s: student v%s failed to load (%s); keeping the previous version", route_name, row["version"], exc)
                self.ledger.record_event(route_name, "student.load_failed", detail={"version": row["version"], "error": str(exc)[:500]})
                continue
            old = self.live.get(route_name)
            if hasattr(live.student, "predict_batch"):
                live.batcher = _Batcher(live.student)
                live.batcher.start()
            self.live[route_name] = live
            self.load_errors.pop(route_name, None)
            policy = self.policy(route_name)
            route = self.routes.get(route_name)
            if route is not None:
                policy.settings = dict(route.settings)
            self._carry_out(route_name, policy.on_version(LiveVersion(live.version, live.curve, live.metrics, live.val_pairs)),
                            actor="router")
            log.info("route %s: student v%d (%s) is serving", route_name, live.version, live.kind)
            await self._carry_evidence(route_name, live)
            if old is not None:
                if old.batcher is not None:
                    await old.batcher.close()
                try:
                    old.student.close()
                except Exception:
                    pass
        for route_name in list(self.live):
            if route_name not in wanted:  # rolled back to nothing or retired
                old = self.live.pop(route_name)
                self._seen.pop(route_name, None)
                if old.batcher is not None:
                    await old.batcher.close()

    def _remember(self, route_name: str, uid: str, messages: list[dict[str, Any]], teacher_answer: str | None) -> None:
        if teacher_answer is None:
            return
        buf = self._labelled.get(route_name)
        if buf is None:
            buf = self._labelled[route_name] = deque(maxlen=CARRY_REQUESTS)
        buf.append((uid, messages, teacher_answer))

    async def _carry_evidence(self, route_name: str, live: LiveStudent) -> None:
        """Score a version that just went live on the labelled requests it never trained on (those
        whose exchange is newer than its newest training exchange): its certification starts from
        them, not from its validation split alone. Off the loop; a failure only means the evidence
        starts empty. The requests are those remembered before it went live (taken before any
        await): every later one is scored as it comes, so none counts twice."""
        buf = self._labelled.get(route_name)
        trained_through = int((live.metrics or {}).get("last_exchange_id") or 0)
        if not buf or not trained_through or not hasattr(live.student, "predict_batch"):
            return
        items = list(buf)

        def score() -> list[tuple[float, bool]]:
            # by exchange id, as the distiller cut its data: a request still in the writer's queue
            # has no id yet and is left out
            ids = self.ledger.exchange_ids([uid for uid, _, _ in items])
            fresh = [(m, a) for uid, m, a in items if ids.get(uid, 0) > trained_through]
            if not fresh:
                return []
            outs = live.student.predict_batch([m for m, _ in fresh])
            return [(o.confidence, live.agrees(o.text, a)) for o, (_, a) in zip(outs, fresh)]

        try:
            scored = await asyncio.to_thread(score)
        except Exception as exc:
            log.info("route %s: v%d not scored on recent labelled requests (%s)", route_name, live.version, exc)
            return
        policy = self.policy(route_name)
        if policy.live is None or policy.live.version != live.version:
            return
        changes: list[ModeChange] = []
        for confidence, agree in scored:
            changes += policy.on_labelled(confidence, agree)
        if scored:
            log.info("route %s: v%d scored on %d labelled requests it never trained on", route_name, live.version, len(scored))
        self._carry_out(route_name, changes, actor="router")

    def _load(self, row: dict[str, Any]) -> LiveStudent:
        from router.student import load_student

        options: dict[str, Any] = {}
        if row["kind"] == "lm":
            options["backend"] = self.settings.student_backend
            if self.settings.student_backend == "vllm":
                import gateway.vllm_backend  # noqa: F401  (registers the "vllm" backend with router.lm_student)
            if self.settings.vllm_base_url:
                options["vllm_base_url"] = self.settings.vllm_base_url
        elif row["kind"] == "lm_structured" and self.settings.student_backend == "vllm":
            import gateway.vllm_structured  # noqa: F401  (registers the "vllm" backend with router.lm_structured)

            options["backend"] = "vllm"
            options["vllm_base_url"] = self.settings.vllm_base_url
        student = load_student(row["artifact_path"], expected_checksum=row["checksum"], **options)
        if hasattr(student, "warm"):
            student.warm()
        return LiveStudent(
            route=row["route"],
            version=int(row["version"]),
            kind=row["kind"],
            checksum=row["checksum"],
            student=student,
            metrics=row["metrics"],
            curve=row["curve"],
            val_pairs=row.get("val_pairs"),  # the bound's evidence for curves stored without "pairs"
            ratios=TokenRatios.from_sums(**self.ledger.token_ratios(row["route"])),
            agreement=agreement_kind(row["kind"], getattr(student, "answer_format", None)),
        )

    def policy(self, route_name: str) -> RoutePolicy:
        """The route's policy (made on first use from the route's settings)."""
        policy = self.policies.get(route_name)
        if policy is None:
            route = self.routes.get(route_name)
            policy = self.policies[route_name] = RoutePolicy(
                route.settings if route else {}, default_target=self.settings.default_target_agreement)
        return policy

    def _carry_out(self, route_name: str, changes: list[ModeChange], *, actor: str) -> None:
        """Persist the policy's mode changes (they reach every process through the store) and record
        each one's event."""
        for change in changes:
            if not change.settings:  # an event about the version, not a mode change
                self.ledger.record_event(route_name, change.event, actor=actor, detail=change.detail)
                log.warning("route %s: %s %s", route_name, change.event, change.detail)
                continue
            claimed = self.routes.claim_change(route_name, expect=change.expect, changes=change.settings,
                                               event=change.event, actor=actor, detail=change.detail)
            if claimed and change.event == "drift.paused":
                log.warning("route %s: live agreement %.3f under target %.3f; back to shadow", route_name,
                            change.detail.get("live_agreement") or 0.0, change.detail.get("target") or 0.0)
            elif not claimed:
                log.info("route %s: %s was already decided elsewhere", route_name, change.event)

    def routes_reloaded(self) -> None:
        """Route settings were reloaded from the store (changed elsewhere): every policy takes the
        new settings (thresholds re-derived, shadow routes that now qualify move to cascade)."""
        for route_name in list(self.policies):
            self.settings_changed(route_name)

    def settings_changed(self, route_name: str) -> None:
        """The route's settings changed: its policy re-derives the threshold (next request on)."""
        route = self.routes.get(route_name)
        if route is not None:
            self._carry_out(route_name, self.policy(route_name).on_settings(route.settings), actor="router")

    def describe(self, route_name: str) -> dict[str, Any]:
        live = self.live.get(route_name)
        out: dict[str, Any] = {"student": None, "threshold_effective": None, "live_agreement": None, "live_checks": 0}
        if live is not None:
            out["student"] = {"version": live.version, "kind": live.kind, "metrics": live.metrics}
            out["curve"] = live.curve
        if route_name in self.policies:
            out.update(self.policies[route_name].describe())
        if route_name in self.load_errors:
            out["load_error"] = self.load_errors[route_name]
        return out

    # -- the request path -----------------------------------------------------------------
    async def _ask(self, live: LiveStudent, body: dict[str, Any]) -> Any:
        if live.batcher is not None:
            coro = live.batcher.predict(body["messages"])
        elif hasattr(live.student, "apredict"):
            coro = live.student.apredict(body["messages"], body)
        else:
            coro = asyncio.to_thread(live.student.predict, body["messages"], body)
        return await asyncio.wait_for(coro, self.settings.student_timeout_s)

    async def try_student(
        self,
        *,
        route: Route,
        body: dict[str, Any],
        principal: Principal,
        headers: dict[str, str],
        uid: str,
        ts: float,
        t0: float,
    ) -> Reply | None:
        """Answer from the student, escalate, or return None to let the teacher answer plainly."""
        mode = route.settings.get("mode", "shadow")
        live = self.live.get(route.name)
        if live is None or mode == "off" or _unsupported(body):
            return None
        escalate = headers.get("x-kdgate-escalate", "").strip().lower()
        force_teacher = escalate in ("1", "true", "yes", "always")
        forbid = escalate in ("0", "false", "no", "never")
        if mode == "shadow" or force_teacher:
            task = asyncio.get_running_loop().create_task(self._ask(live, body))
            try:
                return await self.chat.teacher_chat(
                    route=route, body=body, principal=principal, uid=uid, ts=ts, t0=t0,
                    on_answer=lambda answer: self._score_shadow(route, live, task, answer, uid, in_cascade=False,
                                                                messages=body["messages"]),
                )
            except GatewayError as exc:
                return await self._student_when_teacher_down(route, live, body, principal, uid, ts, t0, exc, task)
        # cascade: the student first
        policy = self.policy(route.name)
        try:
            out = await self._ask(live, body)
        except Exception as exc:
            log.warning("route %s: student v%d failed (%s: %s); escalating", route.name, live.version, type(exc).__name__, exc)
            return await self._escalate(route, body, principal, uid, ts, t0, reason="student_error")
        decision = policy.decide(out.confidence, forbid_escalation=forbid)
        if not decision.use_student:
            async def labelled(answer: str | None) -> dict[str, Any]:
                # every escalation is labelled evidence about the live version, below its threshold
                self._remember(route.name, uid, body["messages"], answer)
                if answer is not None:
                    self._labelled_outcome(route, live, out.confidence, live.agrees(out.text, answer))
                return {}

            return await self._escalate(
                route, body, principal, uid, ts, t0, reason=decision.reason,
                extra_row={"confidence": out.confidence, "student_version": live.version, "student_answer": out.text},
                extra_headers={"x-kdgate-confidence": f"{out.confidence:.4f}", "x-kdgate-student-version": str(live.version)},
                on_answer=labelled,
            )
        return self._student_reply(route, live, body, principal, uid, ts, t0, out)

    async def _escalate(
        self,
        route: Route,
        body: dict[str, Any],
        principal: Principal,
        uid: str,
        ts: float,
        t0: float,
        *,
        reason: str,
        extra_row: dict[str, Any] | None = None,
        extra_headers: dict[str, str] | None = None,
        on_answer: Any = None,
    ) -> Reply:
        if self.metrics is not None:
            self.metrics.observe_escalation(route.name)
        headers = {"x-kdgate-escalation": reason, **(extra_headers or {})}
        try:
            return await self.chat.teacher_chat(
                route=route, body=body, principal=principal, uid=uid, ts=ts, t0=t0, extra_row=extra_row, extra_headers=headers,
                on_answer=on_answer,
            )
        except GatewayError as exc:
            live = self.live.get(route.name)
            if live is None or reason == "student_error":
                raise
            return await self._student_when_teacher_down(route, live, body, principal, uid, ts, t0, exc, None)

    async def _student_when_teacher_down(
        self, route: Route, live: LiveStudent, body: dict[str, Any], principal: Principal, uid: str, ts: float, t0: float,
        exc: GatewayError, task: asyncio.Task | None,
    ) -> Reply:
        """The teacher (and its fallbacks) failed: answer from the student whatever its confidence, if
        the route allows it, marked as such; otherwise the client gets the teacher's error."""
        from gateway.teacher import _is_outage

        if not (route.settings.get("allow_student_when_teacher_down") and _is_outage(exc)):
            raise exc
        try:
            out = await (task if task is not None else self._ask(live, body))
        except Exception:
            raise exc from None
        log.warning("route %s: teacher unavailable (%s); answered by student v%d at confidence %.3f", route.name, exc.status, live.version, out.confidence)
        reply = self._student_reply(route, live, body, principal, uid, ts, t0, out, degraded=f"teacher unavailable ({exc.status})")
        reply.headers["x-kdgate-degraded"] = "teacher-unavailable"
        return reply

    def _student_reply(
        self,
        route: Route,
        live: LiveStudent,
        body: dict[str, Any],
        principal: Principal,
        uid: str,
        ts: float,
        t0: float,
        out: Any,
        degraded: str | None = None,
    ) -> Reply:
        n = int(body.get("n") or 1)
        prompt_chars = sum(len(message_text(m)) for m in body["messages"] if isinstance(m, dict))
        # The counterfactual prices the teacher's token counts, estimated from the route's own tokens
        # per character of its teacher traffic. An LM student's own counts are of its tokenizer and of
        # the prompt with the route's static template stripped: they price what the student did (its
        # cost and the answer's usage), never what the teacher would have charged.
        teacher_prompt = estimate_tokens(prompt_chars, live.ratios.prompt)
        teacher_completion = estimate_tokens(len(out.text), live.ratios.completion)
        counterfactual = self.money.counterfactual(route.teacher.model, prompt_tokens=teacher_prompt,
                                                   completion_tokens=teacher_completion * n)
        used_prompt = out.prompt_tokens or teacher_prompt
        used_completion = out.completion_tokens or teacher_completion
        latency_s = time.perf_counter() - t0
        cost = self.money.student_cost(tokens=used_prompt + used_completion * n, seconds=latency_s)
        usage = {
            "prompt_tokens": used_prompt,
            "completion_tokens": used_completion * n,
            "total_tokens": used_prompt + used_completion * n,
        }
        logprobs = None
        if body.get("logprobs"):
            logprobs = {"content": out.logprobs or [
                {"token": out.text, "logprob": math.log(max(out.confidence, 1e-12)), "bytes": list(out.text.encode()), "top_logprobs": []}
            ]}
        created = int(ts)
        response_id = "chatcmpl-" + uid[4:]
        model = body["model"]
        fingerprint = f"kdgate-student-v{live.version}"
        headers = {
            "x-kdgate-route": route.name,
            "x-kdgate-served-by": "student",
            "x-kdgate-confidence": f"{out.confidence:.4f}",
            "x-kdgate-student-version": str(live.version),
            "x-kdgate-cost-usd": format_usd(cost),
            "x-kdgate-saved-usd": format_usd(saved(counterfactual, cost)),
            "x-request-id": uid,
        }
        response = {
            "id": response_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": out.text, "refusal": None}, "logprobs": logprobs, "finish_reason": "stop"}
                for i in range(n)
            ],
            "usage": usage,
        }
        self.chat.record(
            {
                "uid": uid, "ts": ts, "route": route.name, "key_id": principal.key_id, "endpoint": "chat.completions",
                "model": model, "teacher_model": route.teacher.model, "request": _logged_request(body),
                "response": orjson.dumps(response).decode(), "answer": out.text, "finish_reason": "stop",
                "prompt_tokens": used_prompt, "completion_tokens": used_completion * n, "cost_usd": cost,
                "counterfactual_usd": counterfactual, "latency_ms": latency_s * 1000, "status": 200,
                "served_by": "student", "student_version": live.version, "confidence": out.confidence,
                "student_answer": out.text, "stream": int(bool(body.get("stream"))),
                "error": f"degraded: {degraded}" if degraded else None,
            }
        )
        if self.metrics is not None:
            self.metrics.observe_exchange(route.name, "student", latency_s, cost, counterfactual, Usage(used_prompt, used_completion * n))
        policy = self.policy(route.name)
        policy.on_served(out.confidence)
        # checked with a probability that depends on the confidence (the route's shadow_rate on
        # average); the probability is recorded with the check, whose weight is its inverse
        probability = policy.check_probability(out.confidence)
        if probability > 0 and random.random() < probability:
            self._spawn(self._shadow_check(route, live, body, out.text, uid, confidence=out.confidence,
                                           probability=probability))
        if not body.get("stream"):
            return Reply(body=orjson.dumps(response), headers=headers)
        return Reply(stream=_student_stream(response, body, logprobs), headers=headers)

    # -- shadow checks and drift ----------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _score_shadow(self, route: Route, live: LiveStudent, task: asyncio.Task, answer: str | None, uid: str, *,
                            in_cascade: bool, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The student's side answer in shadow mode, scored against the teacher's."""
        try:
            out = await asyncio.wait_for(task, self.settings.student_timeout_s)
        except Exception as exc:
            log.warning("route %s: shadow student failed (%s)", route.name, type(exc).__name__)
            return {}
        agree = live.agrees(out.text, answer)
        self._record_check(route, live, uid, out.text, answer, agree, cost=0.0, in_cascade=in_cascade,
                           confidence=out.confidence)
        if answer is not None:
            if messages is not None:
                self._remember(route.name, uid, messages, answer)
            self._labelled_outcome(route, live, out.confidence, agree)
        return {"confidence": out.confidence, "student_version": live.version, "student_answer": out.text}

    def _labelled_outcome(self, route: Route, live: LiveStudent, confidence: float, agree: bool) -> None:
        """An unserved answer of ``live`` scored against the teacher's: evidence for its policy."""
        policy = self.policy(route.name)
        if policy.live is not None and policy.live.version == live.version:
            self._carry_out(route.name, policy.on_labelled(confidence, agree), actor="router")

    async def _shadow_check(self, route: Route, live: LiveStudent, body: dict[str, Any], student_answer: str, uid: str, *,
                            confidence: float | None = None, probability: float | None = None) -> None:
        """Also ask the teacher about a student-served request, in the background, and score the student."""
        if self._shadow_slots.locked():
            return  # never queue unbounded background spend; the sample just gets smaller under load
        async with self._shadow_slots:
            from gateway.serving import teacher_body

            try:
                upstream = teacher_body(body, params=self.chat.params)[0]
                upstream.pop("stream", None)
                upstream.pop("stream_options", None)
                resp = await self.chat.teacher.chat(route.teacher, upstream)
            except GatewayError as exc:
                log.info("route %s: shadow teacher call failed (%s)", route.name, exc.status)
                return
            from gateway.protocol import answer_of

            teacher_answer = answer_of(resp.body)[0]
            # the check's cost goes on its own row only (gateway.money: counted once)
            cost = self.money.check_cost(route.teacher.model, Usage.from_openai(resp.body.get("usage")))
            self._remember(route.name, uid, body["messages"], teacher_answer)
            self._record_check(route, live, uid, student_answer, teacher_answer, live.agrees(student_answer, teacher_answer),
                               cost=cost, in_cascade=True, confidence=confidence, probability=probability)

    def _record_check(self, route: Route, live: LiveStudent, uid: str, student_answer: str | None, teacher_answer: str | None,
                      agree: bool, *, cost: float, in_cascade: bool, confidence: float | None = None,
                      probability: float | None = None) -> None:
        self.writer.submit_check({
            "ts": time.time(), "route": route.name, "exchange_uid": uid, "student_version": live.version,
            "student_answer": student_answer, "teacher_answer": teacher_answer, "agree": int(agree), "cost_usd": cost,
            "confidence": confidence, "sample_prob": probability if in_cascade else None,
        })
        if in_cascade:  # a served answer checked: the policy's evidence, revocation tests and drift monitor
            policy = self.policy(route.name)
            same = policy.live is not None and policy.live.version == live.version
            self._carry_out(route.name, policy.on_check(agree, confidence=confidence if same else None,
                                                        probability=probability), actor="drift-monitor")


def _unsupported(body: dict[str, Any]) -> bool:
    """Requests a label/LM student cannot answer faithfully go to the teacher."""
    return bool(body.get("tools") or body.get("functions") or body.get("audio") or body.get("modalities"))


async def _student_stream(response: dict[str, Any], body: dict[str, Any], logprobs: dict[str, Any] | None) -> AsyncIterator[bytes]:
    """A student answer as OpenAI's chunks: role, content, finish, optional usage, [DONE]."""
    base = {k: response[k] for k in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    for choice in response["choices"]:
        i = choice["index"]
        text = choice["message"]["content"]
        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        yield _sse({**base, "choices": [{"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}]})
        yield _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": response["usage"]})
    yield b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
