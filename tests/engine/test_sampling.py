"""The sampler on hand-made logits: greedy, top-k, top-p, temperature, per-request seeds. Milliseconds."""

from __future__ import annotations

import pytest
import torch

from cache.api.sampling import SamplingParams
from engine.sampling import Sampler

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draws(params: SamplingParams, n: int = 400, logits: torch.Tensor = LOGITS) -> list[int]:
    sampler = Sampler(torch.device("cpu"))
    rows = logits.expand(n, -1)
    return sampler.sample(rows, [params] * n, [f"r{i}" for i in range(n)])


def test_greedy_is_the_argmax() -> None:
    assert set(draws(SamplingParams(temperature=0))) == {0}
    assert set(draws(SamplingParams(temperature=1.0, top_k=1))) == {0}


def test_top_k_and_top_p_restrict_the_support() -> None:
    torch.manual_seed(0)
    assert set(draws(SamplingParams(top_k=2))) == {0, 1}
    assert set(draws(SamplingParams(top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(SamplingParams(top_p=0.4))) == {0}  # the top token always stays
    assert set(draws(SamplingParams())) == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens() -> None:
    torch.manual_seed(0)
    cold = draws(SamplingParams(temperature=0.2), n=1000)
    hot = draws(SamplingParams(temperature=3.0), n=1000)
    assert cold.count(0) > 900 and hot.count(0) < 450


def test_seeded_requests_are_reproducible_whatever_shares_their_batch() -> None:
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(batch_mates: int) -> list[int]:
        sampler = Sampler(torch.device("cpu"))
        out = []
        for _ in range(20):  # 20 steps of one request, next to unseeded neighbours
            params = [SamplingParams(temperature=1.0)] * batch_mates + [seeded]
            ids = [f"other{i}" for i in range(batch_mates)] + ["me"]
            out.append(sampler.sample(LOGITS.expand(batch_mates + 1, -1), params, ids)[-1])
        return out

    torch.manual_seed(1)
    alone = run(0)
    torch.manual_seed(2)
    assert run(3) == alone
    assert len(set(alone)) > 1, "the seeded stream is a stream, not one repeated draw"
    sampler = Sampler(torch.device("cpu"))
    first = sampler.sample(LOGITS[None], [seeded], ["x"])
    sampler.forget("x")  # a finished request's generator is dropped: the same id starts over
    assert sampler.sample(LOGITS[None], [seeded], ["x"]) == first


@pytest.mark.parametrize(
    "bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=0)]
)
def test_invalid_parameters_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_temperatures_below_the_epsilon_are_greedy() -> None:
    for temperature in (0.0, 5e-324, 1e-300, 9.9e-6):
        assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize("bad", [dict(seed=2**63), dict(seed=-(2**63) - 1), dict(temperature=float("nan"))])
def test_values_the_sampler_cannot_take_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_row_whose_sampling_raises_yields_its_exception_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = Sampler(torch.device("cpu"))
    real = sampler._sample_row

    def sample_row(logits, params, request_id):
        if request_id == "bad":
            raise RuntimeError("boom")
        return real(logits, params, request_id)

    monkeypatch.setattr(sampler, "_sample_row", sample_row)
    params = [SamplingParams(temperature=1.0, seed=1)] * 3
    out = sampler.sample(LOGITS.expand(3, -1), params, ["a", "bad", "c"])
    assert isinstance(out[1], RuntimeError) and isinstance(out[0], int) and isinstance(out[2], int)
