"""DistiLLM's replay buffer and adaptive off-policy scheduler (training/replay.py)."""

from __future__ import annotations

import io

import pytest
import torch

from tadistill.errors import ConfigError
from tadistill.training.replay import AdaptiveOffPolicy, ReplayBuffer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seqs(start: int, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """n sequences whose first token identifies them: [start + i, 7, 7 ...], lengths vary."""
    seqs = [torch.tensor([start + i] + [7] * (i % 3 + 1)) for i in range(n)]
    return seqs, [1 + i % 2 for i in range(n)]


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as the training checkpoints do."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _ids(buffer: ReplayBuffer) -> list[int]:
    state = buffer.state_dict()
    return [int(s[0]) for s in state["tokens"].split(state["lengths"].tolist())]


# ----------------------------------------------------------------------------------------- buffer


def test_fifo_eviction_keeps_the_newest_in_order():
    buffer = ReplayBuffer(capacity=3)
    buffer.push(*_seqs(0, 2))
    assert len(buffer) == 2 and _ids(buffer) == [0, 1]
    buffer.push(*_seqs(10, 2))
    assert len(buffer) == 3 and _ids(buffer) == [1, 10, 11]
    buffer.push(*_seqs(20, 5))  # more than the capacity in one push
    assert _ids(buffer) == [22, 23, 24]
    assert buffer.state_dict()["prompt_lengths"].tolist() == [1, 2, 1]


def test_push_copies_to_cpu_int64_and_validates():
    buffer = ReplayBuffer(capacity=4)
    seq = torch.tensor([5, 6, 7], dtype=torch.int32)
    buffer.push([seq], [2])
    seq[0] = 99  # the caller's tensor changes after the push
    out, plens = buffer.sample(1, _gen(0))
    assert out[0].tolist() == [5, 6, 7] and out[0].dtype == torch.int64 and plens == [2]
    with pytest.raises(ValueError):
        buffer.push([seq], [1, 2])
    with pytest.raises(ValueError):
        buffer.push([seq], [4])  # prompt longer than the sequence
    with pytest.raises(ValueError):
        buffer.push([torch.zeros(2, 2, dtype=torch.long)], [0])
    with pytest.raises(ValueError):
        buffer.push([torch.ones(3)], [0])  # float ids
    assert len(buffer) == 1  # failed pushes changed nothing
    with pytest.raises(ConfigError):
        ReplayBuffer(capacity=0)


def test_sample_is_deterministic_uniform_and_without_replacement():
    buffer = ReplayBuffer(capacity=10)
    buffer.push(*_seqs(0, 10))
    a, pa = buffer.sample(4, _gen(3))
    b, pb = buffer.sample(4, _gen(3))
    assert [s.tolist() for s in a] == [s.tolist() for s in b] and pa == pb
    firsts = [int(s[0]) for s in a]
    assert len(set(firsts)) == 4  # distinct entries
    draws = {tuple(int(s[0]) for s in buffer.sample(4, _gen(seed))[0]) for seed in range(20)}
    assert len(draws) > 10  # the seed matters
    # Uniform: each of 10 entries is picked with probability 4/10; 2000 draws -> about 800 each.
    g = _gen(0)
    hits = torch.zeros(10)
    for _ in range(2000):
        for s in buffer.sample(4, g)[0]:
            hits[int(s[0])] += 1
    assert hits.min() > 700 and hits.max() < 900
    with pytest.raises(ValueError):
        buffer.sample(11, g)
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=2).sample(1, g)


def test_state_round_trip_gives_identical_future_draws_and_evictions():
    a = ReplayBuffer(capacity=5)
    a.push(*_seqs(0, 7))
    b = ReplayBuffer(capacity=5)
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert _ids(b) == _ids(a) == [2, 3, 4, 5, 6]
    ga, gb = _gen(11), _gen(11)
    for step in range(5):
        sa, pa = a.sample(3, ga)
        sb, pb = b.sample(3, gb)
        assert [s.tolist() for s in sa] == [s.tolist() for s in sb] and pa == pb
        new = _seqs(100 + 10 * step, 2)
        a.push(*new)
        b.push(*new)
        assert _ids(a) == _ids(b)
    empty = ReplayBuffer(capacity=5)
    empty.load_state_dict(_roundtrip(ReplayBuffer(capacity=5).state_dict()))
    assert len(empty) == 0
    with pytest.raises(ConfigError):
        ReplayBuffer(capacity=4).load_state_dict(a.state_dict())


# -------------------------------------------------------------------------------------- scheduler


def test_probability_rises_after_a_worse_validation_loss_only():
    sched = AdaptiveOffPolicy(total_steps=100)  # official defaults: phi0 0, eps 0.1, +0.1, cap 1
    assert sched.probability == 0.0
    assert sched.update(2.0) == 0.0  # the first loss is the reference (measured before training)
    assert sched.update(1.5) == 0.0  # better: no change
    assert sched.reference_loss == 2.0  # and the reference is not lowered
    assert sched.update(2.05) == 0.0  # worse, but by less than eps
    assert sched.update(2.1) == pytest.approx(0.1)  # worse by eps: rise, reference -> 2.1
    assert sched.reference_loss == 2.1
    assert sched.update(2.15) == pytest.approx(0.1)  # measured against the new reference
    assert sched.update(float("nan")) == pytest.approx(0.1)
    loss = 2.1
    for _ in range(20):
        loss += 1.0
        p = sched.update(loss)
    assert p == 1.0  # capped
    capped = AdaptiveOffPolicy(total_steps=10, initial=0.2, maximum=0.5, increment=0.2)
    capped.update(1.0)
    assert capped.update(5.0) == pytest.approx(0.4)
    assert capped.update(9.0) == 0.5


def test_decisions_follow_the_official_rule():
    g = _gen(0)
    off = AdaptiveOffPolicy(total_steps=10, capacity=4)
    assert {off.decide(g, 4, step=5) for _ in range(200)} == {"dataset"}  # phi = 0
    full = AdaptiveOffPolicy(total_steps=10, capacity=4, initial=1.0)
    assert {full.decide(g, 3, step=9) for _ in range(100)} == {"generate"}  # buffer not full yet
    assert {full.decide(g, 4, step=0) for _ in range(100)} == {"generate"}  # decreasing: r(0) = 1
    assert {full.decide(g, 4, step=10) for _ in range(100)} == {"replay"}  # r(T) = 0: reuse only
    assert full.counts == {"dataset": 0, "generate": 200, "replay": 100}
    # phi = 0.4 at half time: generate 0.2, replay 0.2, dataset 0.6.
    mid = AdaptiveOffPolicy(total_steps=10, capacity=4, initial=0.4)
    for _ in range(4000):
        mid.decide(g, 4, step=5)
    frac = {k: v / 4000 for k, v in mid.counts.items()}
    assert frac["generate"] == pytest.approx(0.2, abs=0.03)
    assert frac["replay"] == pytest.approx(0.2, abs=0.03)
    assert frac["dataset"] == pytest.approx(0.6, abs=0.03)
    inc = AdaptiveOffPolicy(total_steps=10, capacity=4, initial=1.0, schedule="increasing")
    assert {inc.decide(g, 4, step=0) for _ in range(50)} == {"replay"}
    assert inc.generate_share(5) == pytest.approx(0.5)
    assert AdaptiveOffPolicy(total_steps=10, initial=0.6, schedule="constant").generate_share(9) == pytest.approx(0.3)


def test_decisions_are_deterministic_and_resume_exactly():
    def run(sched: AdaptiveOffPolicy, g: torch.Generator, steps: range, losses: dict[int, float]) -> list:
        out = []
        for step in steps:
            if step in losses:
                out.append(sched.update(losses[step]))
            out.append(sched.decide(g, buffer_size=min(step, 6), step=step))
        return out

    losses = {0: 3.0, 5: 3.2, 10: 3.1, 15: 3.5, 20: 3.7, 25: 3.9}
    a = AdaptiveOffPolicy(total_steps=30, capacity=6, initial=0.3)
    full = run(a, _gen(5), range(30), losses)
    assert run(AdaptiveOffPolicy(total_steps=30, capacity=6, initial=0.3), _gen(5), range(30), losses) == full
    assert len(set(full) & {"dataset", "generate", "replay"}) == 3  # the run exercises all three

    b = AdaptiveOffPolicy(total_steps=30, capacity=6, initial=0.3)
    gb = _gen(5)
    first = run(b, gb, range(12), losses)
    saved = _roundtrip({"sched": b.state_dict(), "rng": gb.get_state()})
    c = AdaptiveOffPolicy(total_steps=30, capacity=6, initial=0.3)
    c.load_state_dict(saved["sched"])
    gc = torch.Generator()
    gc.set_state(saved["rng"])
    assert first + run(c, gc, range(12, 30), losses) == full
    assert c.state_dict() == a.state_dict()


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError):
        AdaptiveOffPolicy(total_steps=0)
    with pytest.raises(ConfigError):
        AdaptiveOffPolicy(total_steps=10, initial=1.5)
    with pytest.raises(ConfigError):
        AdaptiveOffPolicy(total_steps=10, schedule="sometimes")
    with pytest.raises(ConfigError):
        AdaptiveOffPolicy(total_steps=10, loss_eps=-0.1)
    with pytest.raises(ConfigError):
        AdaptiveOffPolicy(total_steps=10, capacity=0)
