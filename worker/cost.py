"""What a call cost in USD (contract §17): the upstreams file's prices, else ``genai-prices``.

A price comes from one of two places and says which in ``Cost.source``:

- ``upstreams-file``: the upstream's ``prices: {MODEL: {input_per_mtok, ...}}`` entry for
  the model sent upstream (the operator's word wins, whatever the tier);
- ``genai-prices``: the maintained table, by the upstream's ``provider`` id and the model
  sent upstream, with the ``service_tier`` the answer reports (``flex``, ``priority``)
  where the table has a price for it.

Anything else is unknown and gives ``None``: no provider, a provider or model the table
does not know, a tier it has no price for. A price is never guessed.

On the hot path a cost is a handful of ``Decimal`` operations: the table is asked once per
(provider, model, tier, minute) for the model's rates (an lru cache; the minute because
some prices depend on the time of day), and only tiered prices (by prompt length) or audio
tokens go through ``genai_prices`` in full.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import genai_prices
from genai_prices import data_snapshot
from genai_prices.types import PriceCalculation, TieredPrices
from pydantic import BaseModel, ConfigDict, Field

from worker.messages import Usage

__all__ = [
    "Cost",
    "Price",
    "PriceBook",
    "PriceSpec",
    "TokenCounts",
    "infer_provider",
    "known_provider",
    "provider_of",
]

Source = Literal["upstreams-file", "genai-prices"]
MTOK = Decimal(1_000_000)
_MTOK_INT = 1_000_000
#: tiers priced as the standard price; any other tier needs a price of its own
STANDARD_TIERS = frozenset({"auto", "default", "standard", "on_demand"})

# Hosts of the providers' own APIs → genai-prices provider ids. Only hosts that belong to
# one provider: a gateway or a self-hosted server serves anyone's models at anyone's price.
PROVIDER_HOSTS: Mapping[str, str] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "google",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral",
    "api.deepseek.com": "deepseek",
    "api.together.xyz": "together",
    "openrouter.ai": "openrouter",
    "api.openrouter.ai": "openrouter",
    "api.x.ai": "x-ai",
    "api.fireworks.ai": "fireworks",
    "api.cerebras.ai": "cerebras",
    "api.perplexity.ai": "perplexity",
    "api.cohere.ai": "cohere",
    "api.cohere.com": "cohere",
    "api.moonshot.ai": "moonshotai",
    "api.novita.ai": "novita",
}
# Host suffixes: a resource name comes first (``myres.openai.azure.com``).
PROVIDER_HOST_SUFFIXES: Mapping[str, str] = {
    ".openai.azure.com": "azure",
    ".services.ai.azure.com": "azure",
    ".cognitiveservices.azure.com": "azure",
}

UsdPerMtok = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PriceSpec(BaseModel):
    """One model's entry in an upstream's ``prices`` (USD per million tokens).

    ``output_per_mtok`` may be left out for a model that only reads (embeddings); an answer
    with completion tokens then has no known cost. Without ``cached_input_per_mtok``,
    cached prompt tokens cost the input price (the provider gives no discount).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: UsdPerMtok
    output_per_mtok: UsdPerMtok | None = None
    cached_input_per_mtok: UsdPerMtok | None = None


class Cost(BaseModel):
    """``metadata.cost`` of a result (§17)."""

    model_config = ConfigDict(frozen=True)

    input: float
    output: float
    total: float
    currency: Literal["USD"] = "USD"
    source: Source


@dataclass(frozen=True, slots=True)
class Price:
    """Rates in USD per million tokens; ``None`` where the source has no rate."""

    input: Decimal
    output: Decimal | None
    cached_input: Decimal | None
    source: Source

    @classmethod
    def from_spec(cls, spec: PriceSpec) -> Price:
        def dec(value: float | None) -> Decimal | None:
            return None if value is None else Decimal(repr(value))

        return cls(
            Decimal(repr(spec.input_per_mtok)),
            dec(spec.output_per_mtok),
            dec(spec.cached_input_per_mtok),
            "upstreams-file",
        )


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """The counts a price applies to, read from an answer's usage."""

    prompt: int = 0
    cached: int = 0  # of ``prompt``
    completion: int = 0
    prompt_audio: int = 0  # of ``prompt``
    completion_audio: int = 0  # of ``completion``

    @classmethod
    def from_usage(cls, usage: Usage, *, endpoint: Literal["chat", "embeddings"]) -> TokenCounts:
        prompt = max(usage.prompt_tokens or 0, 0)
        details = usage.prompt_tokens_details or {}
        extra = usage.model_extra or {}
        # DeepSeek names its cache hits at the top level.
        cached = _count(details.get("cached_tokens")) or _count(
            extra.get("prompt_cache_hit_tokens")
        )
        if endpoint == "embeddings":
            return cls(prompt=prompt, cached=min(cached, prompt))
        completion_details = usage.completion_tokens_details or {}
        completion = max(usage.completion_tokens or 0, 0)
        return cls(
            prompt=prompt,
            cached=min(cached, prompt),
            completion=completion,
            prompt_audio=min(_count(details.get("audio_tokens")), prompt),
            completion_audio=min(_count(completion_details.get("audio_tokens")), completion),
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def known_provider(provider: str) -> bool:
    """Whether genai-prices has the provider id (for a start-time check of ``provider``)."""
    return any(p.id == provider for p in data_snapshot.get_snapshot().providers)


def provider_of(provider: str | None, base_url: str) -> str | None:
    """An upstream's provider: the one it names, else the one its base URL's host is."""
    return provider or infer_provider(base_url)


def infer_provider(base_url: str) -> str | None:
    """The genai-prices provider id of a provider's own API host, else ``None``."""
    host = (urlsplit(base_url).hostname or "").lower().rstrip(".")
    if provider := PROVIDER_HOSTS.get(host):
        return provider
    for suffix, provider in PROVIDER_HOST_SUFFIXES.items():
        if host.endswith(suffix):
            return provider
    return None


# --- genai-prices, read once per (provider, model, tier, minute) ------------------------


@dataclass(frozen=True, slots=True)
class _Table:
    """A model found in genai-prices whose price is not linear in the tokens (tiers by
    prompt length, a fee per request): each cost is asked of genai-prices in full."""

    provider: str
    model: str
    context: Mapping[str, str] | None


def _calc(
    counts: TokenCounts, table: _Table, at: datetime
) -> PriceCalculation:  # raises LookupError for an unknown provider or model
    usage = genai_prices.Usage(
        input_tokens=counts.prompt,
        cache_read_tokens=counts.cached or None,
        output_tokens=counts.completion,
        input_audio_tokens=counts.prompt_audio or None,
        output_audio_tokens=counts.completion_audio or None,
    )
    return genai_prices.calc_price(
        usage,
        table.model,
        provider_id=table.provider,
        genai_request_timestamp=at,
        price_context=table.context,
    )


@functools.lru_cache(maxsize=4096)
def _table_rates(provider: str, model: str, tier: str | None, minute: int) -> Price | _Table | None:
    """The model's rates from genai-prices at ``minute`` (epoch minutes), a :class:`_Table`
    when they are not a plain rate per token, ``None`` when unknown."""
    context = _table_context(tier)
    table = _Table(provider, model, context)
    at = datetime.fromtimestamp(minute * 60, UTC)
    try:
        zero = _calc(TokenCounts(), table, at)
        uncached = _calc(TokenCounts(prompt=_MTOK_INT), table, at)
        cached = _calc(TokenCounts(prompt=_MTOK_INT, cached=_MTOK_INT), table, at)
        output = _calc(TokenCounts(completion=_MTOK_INT), table, at)
    except (LookupError, ValueError):
        return None
    if context is not None and not _has_variant(zero, context):
        return None  # the table has no price for this tier: unknown, not the standard one
    prices = zero.model_price.__dict__.values()
    if zero.total_price != 0 or any(isinstance(p, TieredPrices) for p in prices):
        return table
    return Price(
        input=uncached.input_price,
        output=output.output_price,
        cached_input=cached.input_price,
        source="genai-prices",
    )


def _has_variant(calculation: PriceCalculation, context: Mapping[str, str]) -> bool:
    model, provider = calculation.model, calculation.provider
    # genai-prices applies variants only to a provider's own models, not to those it
    # borrows from another provider (Azure's OpenAI models).
    if not any(model is own for own in provider.models):
        return False
    return any(
        all(context.get(k) == v for k, v in variant.when.items())
        for variant in model.price_variants or ()
    )


# --- the book ------------------------------------------------------------------------------


class PriceBook:
    """Prices of every upstream: its ``prices`` entries first, then genai-prices.

    ``overrides`` maps an upstream's name to its ``prices`` (model sent upstream →
    :class:`PriceSpec`); ``clock`` gives epoch seconds (the price of a time of day).
    """

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, PriceSpec]] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._overrides = {
            upstream: {model: Price.from_spec(spec) for model, spec in prices.items()}
            for upstream, prices in (overrides or {}).items()
        }
        self._clock = clock

    @classmethod
    def from_upstreams(cls, specs: Iterable[Any]) -> PriceBook:
        """A book from the upstreams' specs (their ``name`` and ``prices``, when they have
        the field)."""
        return cls(
            {spec.name: prices for spec in specs if (prices := getattr(spec, "prices", None))}
        )

    def price(
        self,
        provider: str | None,
        model: str,
        service_tier: str | None = None,
        *,
        upstream: str | None = None,
    ) -> Price | None:
        """The rates of ``model`` on that upstream, or ``None`` when unknown or tiered."""
        rates = self._rates(provider, model, service_tier, upstream)
        return rates if isinstance(rates, Price) else None

    def cost(
        self,
        provider: str | None,
        model: str,
        usage: Usage,
        service_tier: str | None = None,
        *,
        upstream: str | None = None,
        endpoint: Literal["chat", "embeddings"] = "chat",
    ) -> Cost | None:
        """What an answer's ``usage`` cost. ``model`` is the name sent upstream and
        ``service_tier`` the tier the answer reports; embeddings pay the input price only."""
        counts = TokenCounts.from_usage(usage, endpoint=endpoint)
        return self.cost_of(provider, model, counts, service_tier, upstream=upstream)

    def cost_of(
        self,
        provider: str | None,
        model: str,
        counts: TokenCounts,
        service_tier: str | None = None,
        *,
        upstream: str | None = None,
    ) -> Cost | None:
        """:meth:`cost` of counts already read."""
        rates = self._rates(provider, model, service_tier, upstream)
        if rates is None:
            return None
        if isinstance(rates, _Table):
            return self._cost_in_full(counts, rates)
        audio = counts.prompt_audio or counts.completion_audio
        if audio and rates.source == "genai-prices" and provider is not None:
            # Audio has rates of its own in the table: the full calculation knows them.
            table = _Table(provider, model, _table_context(service_tier))
            return self._cost_in_full(counts, table)
        if rates.output is None and counts.completion:
            return None
        uncached = counts.prompt - counts.cached
        cached_rate = rates.input if rates.cached_input is None else rates.cached_input
        input_usd = (uncached * rates.input + counts.cached * cached_rate) / MTOK
        output_usd = counts.completion * (rates.output or 0) / MTOK
        return Cost(
            input=float(input_usd),
            output=float(output_usd),
            total=float(input_usd + output_usd),
            source=rates.source,
        )

    def estimate_max_cost(
        self,
        provider: str | None,
        model: str,
        prompt_tokens_estimate: int,
        max_output_tokens: int,
        service_tier: str | None = None,
        *,
        upstream: str | None = None,
    ) -> float | None:
        """The most a call can cost, for a budget reservation: the prompt estimate uncached
        plus the maximum output (0 for embeddings), in USD; ``None`` when no price is known."""
        counts = TokenCounts(
            prompt=max(prompt_tokens_estimate, 0), completion=max(max_output_tokens, 0)
        )
        cost = self.cost_of(provider, model, counts, service_tier, upstream=upstream)
        return None if cost is None else cost.total

    def _rates(
        self, provider: str | None, model: str, tier: str | None, upstream: str | None
    ) -> Price | _Table | None:
        own = self._overrides.get(upstream) if upstream is not None else None
        if own is not None and (price := own.get(model)) is not None:
            return price
        if provider is None:
            return None
        return _table_rates(provider, model, tier, int(self._clock() // 60))

    def _cost_in_full(self, counts: TokenCounts, table: _Table) -> Cost | None:
        at = datetime.fromtimestamp(self._clock(), UTC)
        try:
            calculation = _calc(counts, table, at)
        except (LookupError, ValueError):
            return None
        total = calculation.input_price + calculation.output_price
        if not math.isfinite(total):
            return None
        return Cost(
            input=float(calculation.input_price),
            output=float(calculation.output_price),
            total=float(total),
            source="genai-prices",
        )


def _table_context(tier: str | None) -> Mapping[str, str] | None:
    return None if tier is None or tier in STANDARD_TIERS else {"service_tier": tier}
