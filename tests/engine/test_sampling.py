"""The sampler on hand-made logits: greedy, top-k, top-p, temperature, per-sequence seeds, logit bias,
penalties and logprobs, each against a reference written out from its definition. Milliseconds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cache.api.sampling import SamplingParams
from engine.sampling import MIN_LOGPROB, Sampled, Sampler
from engine.sequence import Sequence

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def seq(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None) -> Sequence:
    s = Sequence("r", prompt or [0], params)
    s.output_ids = list(output or [])
    return s


def tokens(results: list[Sampled | Exception]) -> list[int]:
    assert all(isinstance(r, Sampled) for r in results), results
    return [r.token for r in results]  # type: ignore[union-attr]


def draws(params: SamplingParams, n: int = 400, logits: torch.Tensor = LOGITS) -> list[int]:
    sampler = Sampler(torch.device("cpu"))
    return tokens(sampler.sample(logits.expand(n, -1), [seq(params) for _ in range(n)]))


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


def test_seeded_sequences_are_reproducible_whatever_shares_their_batch() -> None:
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(batch_mates: int) -> list[int]:
        sampler = Sampler(torch.device("cpu"))
        me = seq(seeded)
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(batch_mates)]
        out = []
        for _ in range(20):  # 20 steps of one request, next to unseeded neighbours
            out.append(tokens(sampler.sample(LOGITS.expand(batch_mates + 1, -1), [*others, me]))[-1])
        return out

    torch.manual_seed(1)
    alone = run(0)
    torch.manual_seed(2)
    assert run(3) == alone
    assert len(set(alone)) > 1, "the seeded stream is a stream, not one repeated draw"
    sampler, me = Sampler(torch.device("cpu")), seq(seeded)
    first = sampler.sample(LOGITS[None], [me])
    sampler.forget(me)  # a finished sequence's generator is dropped: it would start over
    assert sampler.sample(LOGITS[None], [me]) == first
    # two sequences with the same seed (two requests, or a request id reused) never share a stream
    a, b = seq(seeded), seq(seeded)
    together = [tokens(sampler.sample(LOGITS.expand(2, -1), [a, b])) for _ in range(20)]
    assert [t[0] for t in together] == [t[1] for t in together] == alone


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=0),
        dict(n=0),
        dict(n=17),
        dict(logprobs=21),
        dict(logprobs=-1),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=float("nan")),
        dict(repetition_penalty=0),
        dict(repetition_penalty=101),
        dict(logit_bias=((1, 101.0),)),
        dict(logit_bias=((1, 1.0), (1, 2.0))),
        dict(logit_bias=((-1, 1.0),)),
    ],
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
    rows = [seq(SamplingParams(temperature=1.0, seed=1)) for _ in range(3)]

    def sample_row(logits, params, s):
        if s is rows[1]:
            raise RuntimeError("boom")
        return real(logits, params, s)

    monkeypatch.setattr(sampler, "_sample_row", sample_row)
    out = sampler.sample(LOGITS.expand(3, -1), rows)
    assert isinstance(out[1], RuntimeError) and isinstance(out[0], Sampled) and isinstance(out[2], Sampled)


# -- logit bias, penalties, logprobs against their definitions -------------------------------------
def reference_logits(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """OpenAI's and HF's formulas, token by token, in vLLM's order: bias, repetition, frequency, presence."""
    p, x = s.sampling, logits.clone()
    for token, bias in p.logit_bias:
        x[token] += bias
    for token in set(s.prompt_ids) | set(s.output_ids):  # HF: every token of the sequence so far
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token, count in Counter(s.output_ids).items():  # OpenAI: output tokens only
        x[token] -= count * p.frequency_penalty + p.presence_penalty
    return x


VOCAB = 50
MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, presence_penalty=1.5),
    SamplingParams(temperature=0, frequency_penalty=0.7),
    SamplingParams(temperature=0, repetition_penalty=1.8),
    SamplingParams(temperature=0, repetition_penalty=0.6, frequency_penalty=-0.4, presence_penalty=-1.0),
    SamplingParams(temperature=0, logit_bias=((3, 100.0), (7, -100.0), (11, 2.5))),
    SamplingParams(temperature=0, logit_bias=((5, 1.0),), presence_penalty=2.0, repetition_penalty=1.3),
    SamplingParams(temperature=0, logprobs=3),
]


def test_a_mixed_batch_gives_each_row_its_own_reference() -> None:
    """Plain rows, rows with one or several adjustments: each row's greedy token is the argmax of
    its own reference logits, over several steps of growing histories (the counts are incremental)."""
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(torch.device("cpu"))
    rows = [seq(p, prompt=[1, 2, 3, 2, 40], output=[]) for p in MIXED]
    for _ in range(12):
        logits = torch.randn(len(rows), VOCAB, generator=gen) * 3
        got = tokens(sampler.sample(logits, rows))
        for i, s in enumerate(rows):
            assert got[i] == int(reference_logits(logits[i], s).argmax()), (i, s.sampling)
            s.output_ids.append(got[i])
    assert rows[0].output_ids != rows[1].output_ids  # the penalties did something


def test_penalties_follow_a_sequence_that_gained_several_tokens_at_once() -> None:
    """After a preemption or a fork the sampler sees several new tokens at once: same result."""
    p = SamplingParams(temperature=0, frequency_penalty=1.0, repetition_penalty=1.5, presence_penalty=0.5)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(torch.device("cpu"))
    s = seq(p, prompt=[4, 5], output=[6])
    sampler.sample(logits, [s])
    s.output_ids += [6, 7, 8, 6]
    assert tokens(sampler.sample(logits, [s]))[0] == int(reference_logits(logits[0], s).argmax())


def test_seeded_sampling_draws_from_the_adjusted_distribution() -> None:
    p = SamplingParams(temperature=0.7, top_k=10, seed=5, logit_bias=((2, 5.0),), frequency_penalty=1.0)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    s = seq(p, output=[2, 2, 9])
    got = tokens(Sampler(torch.device("cpu")).sample(logits, [s]))[0]
    x = reference_logits(logits[0], s) / p.temperature
    x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    want = torch.multinomial(torch.softmax(x, -1), 1, generator=torch.Generator().manual_seed(5))
    assert got == int(want)


def test_logprobs_are_the_raw_distribution_whatever_the_sampling() -> None:
    """Bias, penalties and temperature change the token, not the reported (raw) logprobs."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    raw = logits.log_softmax(-1)
    plain = seq(SamplingParams(temperature=0, logprobs=5))
    adjusted = seq(
        SamplingParams(temperature=0.5, seed=1, logprobs=2, logit_bias=((0, 100.0),), presence_penalty=2.0),
        output=[1, 2],
    )
    none = seq(SamplingParams(temperature=0))
    out = Sampler(torch.device("cpu")).sample(torch.cat([logits, logits[:1]]), [plain, adjusted, none])
    assert isinstance(out[2], Sampled) and out[2].logprobs is None
    for row, result, k in ((0, out[0], 5), (1, out[1], 2)):
        assert isinstance(result, Sampled) and result.logprobs is not None
        assert result.logprobs.logprob == pytest.approx(raw[row, result.token].item(), abs=1e-6)
        top = raw[row].topk(k)
        assert [t for t, _ in result.logprobs.top] == top.indices.tolist()
        assert [v for _, v in result.logprobs.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out[1].token == 0  # type: ignore[union-attr]  # the bias won, the logprob says how unlikely
    zero = Sampler(torch.device("cpu")).sample(logits[:1], [seq(SamplingParams(temperature=0, logprobs=0))])
    assert zero[0].logprobs.top == () and zero[0].logprobs.logprob == pytest.approx(raw[0].max().item())  # type: ignore[union-attr]


def test_impossible_tokens_report_a_finite_floor() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    forced = seq(SamplingParams(temperature=0, logprobs=3, logit_bias=((1, 100.0),)))
    (result,) = Sampler(torch.device("cpu")).sample(logits, [forced])
    assert isinstance(result, Sampled) and result.logprobs is not None
    assert result.logprobs.top[-1] == (1, MIN_LOGPROB)
