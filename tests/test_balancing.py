"""Load balancing: the auxiliary-loss-free bias update and the expert-usage monitor."""

import math

import pytest
import torch

import moeflux
from moeflux.balancing import ExpertBiasUpdater, ExpertUsageMonitor
from moeflux.ops.routing import route


def test_bias_update_by_hand():
    bias = torch.zeros(4)
    updater = ExpertBiasUpdater(bias, rate=0.01)
    updater.accumulate(torch.tensor([4, 1, 2, 1]))
    updater.accumulate(torch.tensor([1, 0, 1, 3]))  # a second micro-batch of the same step
    load = updater.step()  # load [5, 1, 3, 4], mean 3.25
    assert load.tolist() == [5, 1, 3, 4]
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, -0.01])
    updater.accumulate(torch.tensor([2, 2, 2, 2]))  # balanced: sign 0, no change
    assert updater.step().tolist() == [2, 2, 2, 2]
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, -0.01])
    assert updater.load.tolist() == [0, 0, 0, 0]


def test_bias_update_balances_a_skewed_router():
    """A few hundred steps of the update bring a router that favours some experts near balance,
    as DeepSeek-V3 reports, while the weights stay the un-biased scores."""
    torch.manual_seed(0)
    T, E, k = 512, 8, 2
    logits = torch.randn(T, E) + torch.linspace(-2, 2, E)  # experts 6, 7 are favoured
    router = moeflux.RouterConfig(scoring="sigmoid", expert_bias=True)
    bias = torch.zeros(E)
    updater = ExpertBiasUpdater(bias, rate=0.01)

    def max_violation():
        counts = route(logits, k, router=router, expert_bias=bias).tokens_per_expert.float()
        return float(counts.max() / counts.mean() - 1)

    before = max_violation()
    for _ in range(300):
        r = route(logits, k, router=router, expert_bias=bias, backend="torch")
        updater.accumulate(r.tokens_per_expert)
        updater.step()
    assert before > 1.0
    assert max_violation() < 0.15
    torch.testing.assert_close(r.expert_weights, torch.sigmoid(logits).gather(1, r.expert_ids))


def test_bias_updater_drives_a_layer_buffer():
    router = moeflux.RouterConfig(scoring="sigmoid", expert_bias=True)
    layer = moeflux.MoE(moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=1, router=router))
    updater = ExpertBiasUpdater(layer.expert_bias, rate=0.5)
    _, aux = layer(torch.randn(9, 16))
    updater.accumulate(aux.tokens_per_expert)
    updater.step()
    mean = 9 / 4
    expected = [0.5 * math.copysign(1, mean - n) for n in aux.tokens_per_expert.tolist()]
    assert layer.expert_bias.tolist() == pytest.approx(expected)
    assert layer.weights.expert_bias is layer.expert_bias


def test_usage_monitor_by_hand():
    monitor = ExpertUsageMonitor(4, momentum=0.5, dead_after=2)
    monitor.update(torch.tensor([2, 2, 0, 0]))
    assert monitor.load_fraction.tolist() == [0.5, 0.5, 0.0, 0.0]  # the first update sets it
    monitor.update(torch.tensor([0, 4, 0, 4]), dropped_per_expert=torch.tensor([0, 1, 0, 2]))
    assert monitor.load_fraction.tolist() == [0.25, 0.5, 0.0, 0.25]
    assert monitor.total_tokens.tolist() == [2, 6, 0, 4]
    assert monitor.steps_since_used.tolist() == [1, 0, 2, 0]
    assert monitor.dead_experts().tolist() == [False, False, True, False]
    assert monitor.num_dead_experts() == 1 and monitor.num_updates == 2
    assert monitor.max_violation().item() == pytest.approx(4 * 0.5 - 1)
    summary = monitor.summary()
    assert summary == pytest.approx({"dead_experts": 1.0, "max_violation": 1.0, "min_load_fraction": 0.0,
                                     "max_load_fraction": 0.5, "dropped_fraction": 3 / 12})  # fmt: skip
    monitor.update(torch.tensor([0, 0, 1, 0]))  # expert 2 comes back; expert 0 has now waited 2 steps
    assert monitor.dead_experts().tolist() == [True, False, False, False]


def test_usage_monitor_with_no_tokens_keeps_a_finite_load():
    monitor = ExpertUsageMonitor(3)
    monitor.update(torch.zeros(3, dtype=torch.int64))
    assert monitor.load_fraction.tolist() == [0.0, 0.0, 0.0]
    assert monitor.steps_since_used.tolist() == [1, 1, 1]


def test_capacity_drops_reach_the_monitor():
    router = moeflux.RouterConfig(capacity_factor=0.5)
    layer = moeflux.MoE(moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=2, router=router))
    _, aux = layer(torch.randn(20, 16))
    assert int(aux.dropped_per_expert.sum()) == int((aux.tokens_per_expert - 5).clamp_min(0).sum()) > 0
    monitor = ExpertUsageMonitor(4)
    monitor.update(aux.tokens_per_expert, aux.dropped_per_expert)
    assert monitor.summary()["dropped_fraction"] == pytest.approx(float(aux.dropped_per_expert.sum()) / 40)
