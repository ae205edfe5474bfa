"""Prices (§17): the upstreams file's first, genai-prices else, ``None`` when unknown."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import genai_prices
import pytest
from genai_prices.data import providers as genai_providers
from pydantic import ValidationError

from worker import cost as cost_module
from worker.cost import (
    PROVIDER_HOST_SUFFIXES,
    PROVIDER_HOSTS,
    PriceBook,
    PriceSpec,
    TokenCounts,
    infer_provider,
    known_provider,
    provider_of,
)
from worker.messages import Usage

pytestmark = pytest.mark.unit

NOON = datetime(2030, 6, 1, 12, 0, tzinfo=UTC).timestamp()


def usage(prompt: int, completion: int, cached: int = 0, **extra: Any) -> Usage:
    details = {"cached_tokens": cached} if cached else None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
        **extra,
    )


def genai(
    model: str,
    provider: str,
    *,
    at: float = NOON,
    context: dict[str, str] | None = None,
    **counts: int,
) -> tuple[float, float, float]:
    """genai-prices' own answer, as the floats a Cost holds."""
    calc = genai_prices.calc_price(
        genai_prices.Usage(**counts),  # type: ignore[arg-type]
        model,
        provider_id=provider,
        genai_request_timestamp=datetime.fromtimestamp(at, UTC),
        price_context=context,
    )
    return float(calc.input_price), float(calc.output_price), float(calc.total_price)


@pytest.fixture
def book() -> PriceBook:
    return PriceBook(clock=lambda: NOON)


# --- the upstreams file's prices -----------------------------------------------------------


FILE_PRICES = {
    "mine": {
        "llama-70b": PriceSpec(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.5),
        "plain": PriceSpec(input_per_mtok=1.0, output_per_mtok=3.0),
        "embed": PriceSpec(input_per_mtok=0.1),
        "gpt-4o-mini": PriceSpec(input_per_mtok=1.0, output_per_mtok=1.0),
    }
}


def test_file_prices_charge_cached_tokens_at_the_cached_price() -> None:
    book = PriceBook(FILE_PRICES)
    cost = book.cost(None, "llama-70b", usage(1000, 500, cached=400), upstream="mine")
    assert cost is not None
    # 600 uncached at $2, 400 cached at $0.5, 500 out at $8 (per million)
    assert cost.input == 0.0014
    assert cost.output == 0.004
    assert cost.total == 0.0054
    assert cost.model_dump() == {
        "input": 0.0014,
        "output": 0.004,
        "total": 0.0054,
        "currency": "USD",
        "source": "upstreams-file",
    }


def test_file_prices_without_a_cached_price_charge_the_input_price() -> None:
    cost = PriceBook(FILE_PRICES).cost(None, "plain", usage(1000, 0, cached=400), upstream="mine")
    assert cost is not None
    assert (cost.input, cost.output, cost.total) == (0.001, 0.0, 0.001)


def test_file_price_without_output_rate_prices_embeddings_but_not_completions() -> None:
    book = PriceBook(FILE_PRICES)
    embedded = book.cost(None, "embed", usage(2000, 0), upstream="mine", endpoint="embeddings")
    assert embedded is not None
    assert (embedded.input, embedded.output, embedded.total) == (0.0002, 0.0, 0.0002)
    assert book.cost(None, "embed", usage(10, 5), upstream="mine") is None


def test_file_prices_win_over_genai_prices_on_their_upstream_only(book: PriceBook) -> None:
    book = PriceBook(FILE_PRICES, clock=lambda: NOON)
    own = book.cost("openai", "gpt-4o-mini", usage(1_000_000, 0), upstream="mine")
    other = book.cost("openai", "gpt-4o-mini", usage(1_000_000, 0), upstream="openai")
    assert own is not None and own.source == "upstreams-file" and own.total == 1.0
    assert other is not None and other.source == "genai-prices" and other.total == 0.15


def test_file_prices_apply_whatever_the_tier() -> None:
    cost = PriceBook(FILE_PRICES).cost(None, "plain", usage(1000, 0), "flex", upstream="mine")
    assert cost is not None and cost.total == 0.001


def test_price_spec_is_strict() -> None:
    with pytest.raises(ValidationError):
        PriceSpec(input_per_mtok=-1)
    with pytest.raises(ValidationError):
        PriceSpec(input_per_mtok=float("inf"))
    with pytest.raises(ValidationError):
        PriceSpec.model_validate({"input_per_mtok": 1, "output_per_mtok": 2, "cache": 3})


def test_book_from_upstream_specs() -> None:
    specs = [
        SimpleNamespace(name="mine", prices=FILE_PRICES["mine"]),
        SimpleNamespace(name="other"),  # an UpstreamSpec from before the field
    ]
    cost = PriceBook.from_upstreams(specs).cost(None, "plain", usage(1000, 0), upstream="mine")
    assert cost is not None and cost.source == "upstreams-file"


# --- genai-prices --------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "completion", "cached"), [(1000, 500, 400), (9, 12, 0)])
def test_known_model_costs_what_genai_prices_says(
    book: PriceBook, prompt: int, completion: int, cached: int
) -> None:
    cost = book.cost("openai", "gpt-4o-mini", usage(prompt, completion, cached))
    assert cost is not None and cost.source == "genai-prices" and cost.currency == "USD"
    expected = genai(
        "gpt-4o-mini",
        "openai",
        input_tokens=prompt,
        cache_read_tokens=cached,
        output_tokens=completion,
    )
    assert (cost.input, cost.output, cost.total) == expected


def test_unknown_price_is_none_never_a_guess(book: PriceBook) -> None:
    known = usage(100, 100)
    assert book.cost("openai", "no-such-model-xyz", known) is None
    assert book.cost("no-such-provider", "gpt-4o-mini", known) is None
    assert book.cost(None, "gpt-4o-mini", known) is None  # no provider: not inferred by name
    assert book.estimate_max_cost(None, "gpt-4o-mini", 100, 100) is None


def test_flex_at_the_flex_price_where_known(book: PriceBook) -> None:
    answer = usage(1000, 500, cached=400)
    flex = book.cost("openai", "o3", answer, "flex")
    standard = book.cost("openai", "o3", answer, "default")
    assert flex is not None and standard is not None
    expected = genai(
        "o3",
        "openai",
        context={"service_tier": "flex"},
        input_tokens=1000,
        cache_read_tokens=400,
        output_tokens=500,
    )
    assert (flex.input, flex.output, flex.total) == expected
    assert flex.total == pytest.approx(standard.total / 2)
    assert book.cost("openai", "o3", answer) == standard  # no tier: the standard price


def test_a_tier_without_a_price_of_its_own_is_unknown(book: PriceBook) -> None:
    assert book.cost("openai", "gpt-4o-mini", usage(10, 10), "flex") is None
    assert book.cost("openai", "gpt-4o-mini", usage(10, 10), "auto") is not None


def test_tiered_prices_go_through_genai_prices_in_full(book: PriceBook) -> None:
    long_prompt = usage(300_000, 1000, cached=100_000)
    cost = book.cost("openai", "gpt-5.4", long_prompt)
    assert cost is not None
    expected = genai(
        "gpt-5.4",
        "openai",
        input_tokens=300_000,
        cache_read_tokens=100_000,
        output_tokens=1000,
    )
    assert (cost.input, cost.output, cost.total) == expected
    assert book.price("openai", "gpt-5.4") is None  # no single rate to show


def test_audio_tokens_at_their_own_rates(book: PriceBook) -> None:
    answer = Usage(
        prompt_tokens=1000,
        completion_tokens=500,
        prompt_tokens_details={"audio_tokens": 300},
        completion_tokens_details={"audio_tokens": 200},
    )
    cost = book.cost("openai", "gpt-audio", answer)
    assert cost is not None
    expected = genai(
        "gpt-audio",
        "openai",
        input_tokens=1000,
        input_audio_tokens=300,
        output_tokens=500,
        output_audio_tokens=200,
    )
    assert (cost.input, cost.output, cost.total) == expected


def test_embeddings_pay_the_input_price_only(book: PriceBook) -> None:
    answer = Usage(prompt_tokens=5000, total_tokens=5000, completion_tokens=None)
    cost = book.cost("openai", "text-embedding-3-small", answer, endpoint="embeddings")
    assert cost is not None
    assert (cost.input, cost.output, cost.total) == (0.0001, 0.0, 0.0001)


def test_deepseek_cache_hits_and_time_of_day_prices() -> None:
    answer = usage(1000, 100, prompt_cache_hit_tokens=600)
    for hour in (3, 18):  # DeepSeek's discount hours and its standard hours
        at = datetime(2030, 6, 1, hour, 0, tzinfo=UTC).timestamp()
        cost = PriceBook(clock=lambda at=at: at).cost("deepseek", "deepseek-chat", answer)
        assert cost is not None
        counts = {"input_tokens": 1000, "cache_read_tokens": 600, "output_tokens": 100}
        assert (cost.input, cost.output, cost.total) == genai(
            "deepseek-chat", "deepseek", at=at, **counts
        )


def test_estimate_max_cost_is_the_prompt_uncached_plus_the_whole_output(book: PriceBook) -> None:
    estimate = book.estimate_max_cost("openai", "gpt-4o-mini", 1000, 4096)
    assert estimate == genai("gpt-4o-mini", "openai", input_tokens=1000, output_tokens=4096)[2]
    embeddings = book.estimate_max_cost("openai", "text-embedding-3-small", 5000, 0)
    assert embeddings == 0.0001


def test_rates_are_read_from_genai_prices_once_per_model(
    book: PriceBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    cost_module._table_rates.cache_clear()
    calls = 0
    real = genai_prices.calc_price

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", counting)
    for _ in range(50):
        assert book.cost("openai", "gpt-4o-mini", usage(100, 100, cached=10)) is not None
        assert book.cost("openai", "no-such-model-xyz", usage(1, 1)) is None
    assert calls <= 5  # the rates (4 questions) and the unknown model (1), once each


def test_token_counts_are_clamped_and_tolerate_nulls() -> None:
    counts = TokenCounts.from_usage(
        Usage(
            prompt_tokens=10, completion_tokens=None, prompt_tokens_details={"cached_tokens": 99}
        ),
        endpoint="chat",
    )
    assert counts == TokenCounts(prompt=10, cached=10, completion=0)


# --- provider inference --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "provider"),
    [
        ("https://api.openai.com/v1", "openai"),
        ("https://api.anthropic.com/v1/", "anthropic"),
        ("https://generativelanguage.googleapis.com/v1beta/openai", "google"),
        ("https://api.groq.com/openai/v1", "groq"),
        ("https://api.mistral.ai/v1", "mistral"),
        ("https://api.deepseek.com", "deepseek"),
        ("https://api.together.xyz/v1", "together"),
        ("https://openrouter.ai/api/v1", "openrouter"),
        ("https://API.OpenAI.com/v1", "openai"),
        ("https://myres.openai.azure.com/openai/deployments/gpt-4o", "azure"),
        ("http://127.0.0.1:8000/v1", None),
        ("https://llm.example.com/v1", None),
        ("https://api.openai.com.evil.example/v1", None),
    ],
)
def test_provider_inferred_from_the_base_url_host(base_url: str, provider: str | None) -> None:
    assert infer_provider(base_url) == provider


def test_every_inferred_provider_is_a_genai_prices_provider() -> None:
    by_id = {p.id: p for p in genai_providers}
    for host, provider in PROVIDER_HOSTS.items():
        assert provider in by_id, provider
        assert re.match(by_id[provider].api_pattern, f"https://{host}/v1"), host
    for suffix, provider in PROVIDER_HOST_SUFFIXES.items():
        assert re.match(by_id[provider].api_pattern, f"https://x{suffix}/v1"), suffix


def test_named_provider_wins_and_is_checked_against_genai_prices() -> None:
    assert provider_of("groq", "https://api.openai.com/v1") == "groq"
    assert provider_of(None, "https://api.openai.com/v1") == "openai"
    assert known_provider("anthropic")
    assert not known_provider("opneai")
