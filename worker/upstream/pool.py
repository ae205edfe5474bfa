"""The upstreams a worker calls: who serves a model, in which order, and which are resting.

Routing (contract §11): the upstreams that serve a job's ``model`` (an exact name, a
``model_map`` key, or ``"*"``) at its endpoint (``endpoints``: chat, embeddings, §18) are
tried lowest ``priority`` first; among equal priorities
one is drawn at random in proportion to its ``weight``. An upstream is skipped while it
cools down and, when a gate is attached, while its gate has no budget, unless every
candidate's gate is closed (the job then waits at the best one's gate).

Health (pools of two or more): ``cooldown.failures`` retryable failures
(``upstream_error``, ``timeout``) in a row cool an upstream for ``cooldown.seconds``. When
the time is up, exactly one job is let through as a probe: its success brings the upstream
back, its failure cools it again. Any answer that is not a retryable failure (a 2xx, a
400, a 401, a 429) proves the upstream alive. Budget is the gate's business
(:mod:`worker.limits.gate`): a 429 closes the gate, ``insufficient_quota`` cools the gate, and
routing skips an upstream whose gate is not open.

This module knows no broker: :mod:`worker.runner` asks it for a :class:`Lease` per
attempt (:meth:`UpstreamPool.lease`), which admits the call at the member's gate and
reports how it ended, on every path (:mod:`worker.upstream.lease`).
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog

from worker.errors import JobError, ModelNotAllowed, UpstreamError, UpstreamTimeout
from worker.limits.gate import Gate
from worker.messages import Endpoint
from worker.settings import DEFAULT_UPSTREAM, Settings
from worker.upstream.client import Upstream
from worker.upstream.lease import Lease
from worker.upstreams_file import LimitsSpec, UpstreamSpec

__all__ = [
    "Lease",
    "Member",
    "UpstreamPool",
    "provider_for_host",
]

log = structlog.get_logger(__name__)

MAX_ROUTES = 4096  # routes cached by model name; bounded, since "*" takes any name
Clock = Callable[[], float]
MemberState = Literal["open", "cooling", "probing"]

# gen_ai.provider.name well-known values (OpenTelemetry GenAI conventions) by host; any
# other host keeps the default, the API flavour spoken ("openai").
_PROVIDERS_EXACT = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "api.mistral.ai": "mistral_ai",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
}
_PROVIDERS_SUFFIX = (
    (".openai.azure.com", "azure.ai.openai"),
    (".services.ai.azure.com", "azure.ai.inference"),
    (".models.ai.azure.com", "azure.ai.inference"),
    (".inference.ai.azure.com", "azure.ai.inference"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    (".amazonaws.com", "aws.bedrock"),
)
DEFAULT_PROVIDER = "openai"


def _has_budget(member: Member) -> bool:
    """True when the member's gate would let a call through now (or it has none)."""
    return member.gate is None or member.gate.state == "open"


def provider_for_host(host: str | None) -> str:
    """``gen_ai.provider.name`` for an upstream host, where the host says it."""
    host = (host or "").lower()
    if host in _PROVIDERS_EXACT:
        return _PROVIDERS_EXACT[host]
    for suffix, provider in _PROVIDERS_SUFFIX:
        if host.endswith(suffix) and (suffix != ".amazonaws.com" or "bedrock" in host):
            return provider
    return DEFAULT_PROVIDER


@dataclass(eq=False, slots=True)
class Member:
    """One upstream of the pool: its spec, its client, its gate and its health."""

    spec: UpstreamSpec
    client: Upstream
    gate: Gate | None = None
    host: str | None = None
    provider: str = DEFAULT_PROVIDER
    failures: int = 0  # retryable failures in a row
    cooling_until: float | None = None  # clock time the cooldown ends; None when healthy
    probing: bool = False  # a probe job holds it
    cause: str | None = None  # why its last failed attempt failed, in a few words

    @property
    def name(self) -> str:
        return self.spec.name

    def state(self, now: float) -> MemberState:
        if self.cooling_until is None:
            return "open"
        return "probing" if self.probing or now >= self.cooling_until else "cooling"


@dataclass(eq=False, slots=True)
class _Route:
    """The members serving one model, grouped by priority (lowest first)."""

    tiers: list[list[Member]]
    cumulative: list[list[float]] = field(default_factory=list)
    alone: Member | None = None  # the only member, when there is one

    def __post_init__(self) -> None:
        self.cumulative = [list(itertools.accumulate(m.spec.weight for m in t)) for t in self.tiers]
        if len(self.tiers) == 1 and len(self.tiers[0]) == 1:
            self.alone = self.tiers[0][0]


class UpstreamPool:
    """The upstreams of a worker, each with its own connection pool (and gate)."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not members:
            raise ValueError("a pool needs at least one upstream")
        self.members = list(members)
        self._clock = clock
        self._random = (rng or random.Random()).random
        self._routes: dict[tuple[Endpoint, str], _Route] = {}
        # A pool of one has nothing to fall back to: resting its only upstream would only
        # delay jobs that backoff already spaces out (LiteLLM's router does the same).
        self._cooldowns = len(self.members) > 1

    @classmethod
    def from_specs(
        cls,
        specs: Iterable[UpstreamSpec],
        *,
        max_connections: int = 64,
        transport: Callable[[UpstreamSpec], httpx.AsyncBaseTransport | None] | None = None,
        gate: Callable[[UpstreamSpec], Gate | None] | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> UpstreamPool:
        """A member per spec, each with an HTTP client of its own."""
        members = []
        for spec in specs:
            client = Upstream(
                spec.url,
                spec.api_key.get_secret_value() if spec.api_key else None,
                auth=spec.auth,
                query=spec.query,
                headers=spec.headers,
                max_connections=max_connections,
                transport=transport(spec) if transport else None,
            )
            host = urlsplit(spec.base_url).hostname
            members.append(
                Member(
                    spec,
                    client,
                    gate=gate(spec) if gate else None,
                    host=host,
                    provider=provider_for_host(host),
                )
            )
        return cls(members, clock=clock, rng=rng)

    @classmethod
    def single(cls, client: Upstream, spec: UpstreamSpec) -> UpstreamPool:
        """A pool of one around a client made elsewhere (tests, benchmarks)."""
        host = urlsplit(spec.base_url).hostname
        return cls([Member(spec, client, host=host, provider=provider_for_host(host))])

    @classmethod
    def of_client(cls, client: Upstream, settings: Settings) -> UpstreamPool:
        """A client made elsewhere (tests, benchmarks) as the pool of one ``default``, with
        the limits of the ``WORKER_UPSTREAM_*`` variables."""
        spec = UpstreamSpec(
            name=DEFAULT_UPSTREAM,
            base_url=client.base_url,
            models=["*"],
            provider=settings.upstream_provider,
            limits=LimitsSpec(
                rpm=settings.upstream_rpm,
                tpm=settings.upstream_tpm,
                max_concurrency=settings.upstream_max_concurrency,
            ),
        )
        return cls.single(client, spec)

    async def aclose(self) -> None:
        for member in self.members:
            await member.client.aclose()

    # Routing ----------------------------------------------------------------------------

    def route(self, model: str, endpoint: Endpoint = "chat") -> _Route:
        """The members that serve ``model`` at ``endpoint``; raises :class:`ModelNotAllowed`
        when none does."""
        route = self._routes.get((endpoint, model))
        if route is None:
            serving = sorted(
                (m for m in self.members if m.spec.serves(model, endpoint)),
                key=lambda m: m.spec.priority,
            )
            if not serving:
                at = "" if endpoint == "chat" else f" for {endpoint}"
                raise ModelNotAllowed(f"no upstream serves model {model!r}{at}")
            tiers = [list(g) for _, g in itertools.groupby(serving, lambda m: m.spec.priority)]
            if len(self._routes) >= MAX_ROUTES:  # "*" serves any name a producer sends
                self._routes.clear()
            route = self._routes[endpoint, model] = _Route(tiers)
        return route

    def lease(
        self,
        model: str,
        tokens: int,
        exclude: Collection[Member] = (),
        *,
        ready: bool = False,
        endpoint: Endpoint = "chat",
    ) -> Lease | None:
        """A :class:`Lease` for one call of ``tokens`` (estimated) on the member
        :meth:`choose` picks, or None when it picks none. Enter it at once: from here on,
        leaving it is what frees a probe."""
        member = self.choose(model, exclude, ready=ready, endpoint=endpoint)
        if member is None:
            return None
        # Read at once: another job cannot take a member being probed, so the flag is ours.
        return Lease(self, member, probe=member.probing, tokens=tokens)

    def choose(
        self,
        model: str,
        exclude: Collection[Member] = (),
        *,
        ready: bool = False,
        endpoint: Endpoint = "chat",
    ) -> Member | None:
        """The member for the next attempt at ``model``, or None when every one not in
        ``exclude`` is cooling down (or probed by another job).

        Preference: lowest priority whose gate is open, by weight among equals; when no
        candidate's gate is open, the best one whose gate is not (the caller waits at it),
        unless ``ready``. Choosing a member whose cooldown is over makes this job its probe.
        """
        route = self.route(model, endpoint)
        now = self._clock()
        if route.alone is not None and not exclude:  # a pool of one: nothing to weigh
            member = route.alone
            if ready and not _has_budget(member):
                return None
            return self._take(member) if self._usable(member, now) else None
        fallback: Member | None = None
        for tier, cumulative in zip(route.tiers, route.cumulative, strict=True):
            usable = [m for m in tier if m not in exclude and self._usable(m, now)]
            ready_now = [m for m in usable if _has_budget(m)]
            if ready_now:
                return self._take(self._draw(ready_now, tier, cumulative))
            if usable and fallback is None:
                fallback = self._draw(usable, tier, cumulative)
        return None if fallback is None or ready else self._take(fallback)

    def _draw(self, among: list[Member], tier: list[Member], cumulative: list[float]) -> Member:
        """A weighted draw among ``among`` (a subset of ``tier``)."""
        if len(among) == len(tier):
            index = bisect.bisect_right(cumulative, self._random() * cumulative[-1])
            return tier[min(index, len(tier) - 1)]
        weights = list(itertools.accumulate(m.spec.weight for m in among))
        index = bisect.bisect_right(weights, self._random() * weights[-1])
        return among[min(index, len(among) - 1)]

    @staticmethod
    def _usable(member: Member, now: float) -> bool:
        if member.cooling_until is None:
            return True
        return not member.probing and now >= member.cooling_until

    def _take(self, member: Member) -> Member:
        if member.cooling_until is not None:
            member.probing = True
            log.info("upstream probe", upstream=member.name)
        return member

    def cooling_wait(
        self, model: str, exclude: Collection[Member] = (), endpoint: Endpoint = "chat"
    ) -> float:
        """Seconds until a member of ``model`` (at ``endpoint``) not in ``exclude`` may be
        tried again (0 when one is probed by another job: its answer may come any moment)."""
        now = self._clock()
        waits = [
            0.0 if m.probing else max((m.cooling_until or now) - now, 0.0)
            for tier in self.route(model, endpoint).tiers
            for m in tier
            if m not in exclude
        ]
        return min(waits, default=0.0)

    def cooling_cause(self, model: str, endpoint: Endpoint = "chat") -> str | None:
        """``upstream: cause`` of the member of ``model`` that cooled down last, for the
        error of a job that finds every one resting (None when none says why)."""
        resting = [
            m
            for tier in self.route(model, endpoint).tiers
            for m in tier
            if m.cooling_until is not None
        ]
        latest = max(resting, key=lambda m: m.cooling_until or 0.0, default=None)
        if latest is None or latest.cause is None:
            return None
        return f"{latest.name}: {latest.cause}"

    # Health -----------------------------------------------------------------------------

    def report(
        self, member: Member, error: JobError | None, *, probe: bool, cancelled: bool = False
    ) -> None:
        """How an attempt on ``member`` ended: ``error`` None is a success. ``probe`` says
        the attempt was the member's probe (``member.probing`` right after :meth:`choose`);
        a cancelled attempt proves nothing and frees the probe for another job."""
        if error is not None and not cancelled:
            member.cause = error.cause or error.code.value
        if not self._cooldowns:
            return
        if cancelled:
            if probe:
                member.probing = False
            return
        if isinstance(error, UpstreamError | UpstreamTimeout):
            if member.cooling_until is not None and not probe:
                return  # a call that began before the cooldown: already counted
            member.failures += 1
            if probe or member.failures >= member.spec.cooldown.failures:
                self._cool(member, member.spec.cooldown.seconds, error.code.value)
        else:
            self._healthy(member)

    def _cool(self, member: Member, seconds: float, reason: str) -> None:
        probe_failed = member.probing
        member.cooling_until = self._clock() + seconds
        member.probing = False
        log.warning(
            "upstream cooling down",
            upstream=member.name,
            seconds=seconds,
            reason=reason,
            cause=member.cause,
            failures=member.failures,
            probe_failed=probe_failed,
        )

    def _healthy(self, member: Member) -> None:
        if member.cooling_until is not None:
            log.info("upstream back", upstream=member.name)
        member.failures = 0
        member.cooling_until = None
        member.probing = False

    def states(self) -> dict[str, MemberState]:
        """Each member's health now, by name (for metrics and the operator page)."""
        now = self._clock()
        return {m.name: m.state(now) for m in self.members}

    def gates(self) -> dict[str, dict[str, Any]]:
        """Each upstream's state with its gate's and its budget as last read, by name (for
        the heartbeat, §14): ``state`` (``open``, ``cooling``, or the gate's own),
        ``remaining_requests``/``remaining_tokens``, ``cooldown_s``."""
        now = self._clock()
        states: dict[str, dict[str, Any]] = {}
        for member in self.members:
            state = "cooling" if member.state(now) != "open" else "open"
            report: dict[str, Any] = {}
            if member.gate is not None:
                gate_state = member.gate.state.value
                state = gate_state if gate_state != "open" else state
                for kind, value in member.gate.remaining().items():
                    report[f"remaining_{kind}"] = value
            if member.cooling_until is not None:
                report["cooldown_s"] = round(max(member.cooling_until - now, 0.0), 1)
            states[member.name] = {"state": state, **report}
        return states
