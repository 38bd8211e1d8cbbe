"""The LTE invariants of docs/design.md section 2, pinned in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lte.common.core.layers import LTEConfig, LTELinear, LTETiedLinear
from lte.common.core.merge import HeadUpdate, ReplicaUpdate, apply_updates, merge_head_deltas
from lte.common.core.model_state import (
    commit_merge,
    export_head_factors,
    lte_layers,
    plain_state_dict,
    replica_parameters,
    trainable_parameters,
)
from lte.common.core.policy import export_replica_deltas, load_master_weights, prepare_model
from lte.common.core.quant import quantize
from lte.common.data.datasets import load_dataset
from lte.common.job.config import JobConfig
from lte.common.job.trainer import LocalTrainer, make_optimizer

TOL = dict(rtol=1e-10, atol=1e-10)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()


class MultiHeadLoRA(nn.Module):
    """Reference: y = W x + (s/N) sum_i B_i A_i x on a frozen W, heads trained jointly."""

    def __init__(self, linear: nn.Linear, a_init: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight = linear.weight.detach().clone()
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.A = nn.Parameter(a_init.detach().clone())
        self.B = nn.Parameter(
            torch.zeros(a_init.shape[0], linear.out_features, a_init.shape[1], dtype=a_init.dtype)
        )
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.A.shape[0]
        delta = torch.einsum("hmr,hrn->mn", self.B, self.A) * (self.scale / n)
        return x @ (self.weight + delta).T + self.bias


def lte_and_reference(heads: int = 4, rank: int = 3, alpha: float = 6.0):
    plain = small_net()
    cfg = LTEConfig(heads=heads, rank=rank, alpha=alpha, seed=7)
    lte = prepare_model(copy.deepcopy(plain), cfg)
    ref = nn.Sequential(
        MultiHeadLoRA(plain[0], lte[0].lora_A, cfg.scale),
        nn.Tanh(),
        MultiHeadLoRA(plain[2], lte[2].lora_A, cfg.scale),
    )
    return lte, ref, cfg


def test_t1_lte_equals_multi_head_lora_outputs_grads_and_adam_steps():
    heads = 4
    lte, ref, cfg = lte_and_reference(heads=heads)
    opt_lte = torch.optim.Adam([p for p in lte.parameters() if p.requires_grad], lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _step in range(5):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        target = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        # every head sees the same batch; the LTE loss is the mean over heads
        y_lte = lte(x.repeat(heads, 1))
        y_ref = ref(x)
        for i in range(heads):
            torch.testing.assert_close(y_lte[i * 8 : (i + 1) * 8], y_ref, **TOL)
        loss_lte = ((y_lte - target.repeat(heads, 1)) ** 2).mean()
        loss_ref = ((y_ref - target) ** 2).mean()
        opt_lte.zero_grad()
        opt_ref.zero_grad()
        loss_lte.backward()
        loss_ref.backward()
        for k in (0, 2):
            torch.testing.assert_close(lte[k].lora_A.grad, ref[k].A.grad, **TOL)
            torch.testing.assert_close(lte[k].lora_B.grad, ref[k].B.grad, **TOL)
            torch.testing.assert_close(lte[k].bias.grad, ref[k].bias.grad, **TOL)
        opt_lte.step()
        opt_ref.step()
        for layer in lte_layers(lte).values():
            layer.merge()  # T = 1: merge after every step
    # W_LTE telescopes to W0 + (s/N) sum_i B_i A_i
    for k in (0, 2):
        w_ref = ref[k].weight + torch.einsum("hmr,hrn->mn", ref[k].B, ref[k].A) * (cfg.scale / heads)
        torch.testing.assert_close(lte[k].weight, w_ref.detach(), **TOL)


def test_after_merge_every_head_computes_w_new_x():
    plain = small_net()
    lte = prepare_model(copy.deepcopy(plain), LTEConfig(heads=3, rank=2, alpha=8.0))
    opt = torch.optim.Adam([p for p in lte.parameters() if p.requires_grad], lr=5e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # T = 4 local steps, heads drift apart
        x = torch.randn(12, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        lte(x).pow(2).mean().backward()
        opt.step()
    x = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    y_before = lte[0](x)
    assert not torch.allclose(y_before, nn.functional.linear(x, lte[0].weight, lte[0].bias))
    for layer in lte_layers(lte).values():
        layer.merge()
        probe = torch.randn(12, layer.in_features, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(layer(probe), nn.functional.linear(probe, layer.weight, layer.bias), **TOL)
    y_after = lte[0](x)
    torch.testing.assert_close(y_after, nn.functional.linear(x, lte[0].weight, lte[0].bias), **TOL)


def test_merge_of_k_heads_equals_explicit_formula():
    gen = torch.Generator().manual_seed(2)
    m, n, r, k = 9, 7, 3, 5
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    factors = [
        tuple(torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((m, r), (r, n), (m, r), (r, n)))
        for _ in range(k)
    ]
    weights = [0.3, 1.0, -0.5, 2.0, 0.01]
    w = w0.clone()
    merge_head_deltas(w, factors, weights)
    expected = w0 + sum(wt * (b @ a - bp @ ap) for (b, a, bp, ap), wt in zip(factors, weights, strict=True))
    torch.testing.assert_close(w, expected, **TOL)


def test_apply_updates_uses_and_replaces_previous_factors():
    gen = torch.Generator().manual_seed(3)
    m, n, r = 5, 4, 2
    master = {
        "fc.weight": torch.randn(m, n, generator=gen, dtype=torch.float64),
        "fc.bias": torch.zeros(m, dtype=torch.float64),
    }
    w0 = master["fc.weight"].clone()
    prev: dict = {}
    f1 = {
        h: (
            torch.randn(m, r, generator=gen, dtype=torch.float64),
            torch.randn(r, n, generator=gen, dtype=torch.float64),
        )
        for h in (0, 1)
    }
    apply_updates(master, prev, [HeadUpdate(h, {"fc.weight": f1[h]}) for h in (0, 1)], [0.5, 0.5], scale=2.0)
    expected = w0 + 2.0 * 0.5 * sum(b @ a for b, a in f1.values())
    torch.testing.assert_close(master["fc.weight"], expected, **TOL)
    f2 = {
        0: (
            torch.randn(m, r, generator=gen, dtype=torch.float64),
            torch.randn(r, n, generator=gen, dtype=torch.float64),
        )
    }
    reps = [
        (0.25, ReplicaUpdate(1, {"fc.bias": torch.ones(m, dtype=torch.float64)})),
        (0.75, ReplicaUpdate(3, {"fc.bias": -torch.ones(m, dtype=torch.float64)})),
    ]
    apply_updates(master, prev, [HeadUpdate(0, {"fc.weight": f2[0]})], [0.5], reps, scale=2.0)
    expected = expected + 2.0 * 0.5 * (f2[0][0] @ f2[0][1] - f1[0][0] @ f1[0][1])
    torch.testing.assert_close(master["fc.weight"], expected, **TOL)
    torch.testing.assert_close(master["fc.bias"], torch.full((m,), 0.25 - 0.75, dtype=torch.float64), **TOL)
    torch.testing.assert_close(prev[0]["fc.weight"][0], f2[0][0], **TOL)


def test_reset_variant_zeroes_b_keeps_a_and_merges_only_new_progress():
    lte = prepare_model(small_net(), LTEConfig(heads=2, rank=2, alpha=4.0, reset=True))
    opt = torch.optim.Adam([p for p in lte.parameters() if p.requires_grad], lr=5e-2)
    x = torch.randn(6, 6, dtype=torch.float64)
    for _round in range(2):
        for _ in range(3):
            opt.zero_grad()
            lte(x).pow(2).mean().backward()
            opt.step()
        layer = lte[0]
        w_before = layer.weight.clone()
        a_before = layer.lora_A.detach().clone()
        expected = (
            w_before + (layer.scale / 2) * torch.einsum("hmr,hrn->mn", layer.lora_B, layer.lora_A).detach()
        )
        for l in lte_layers(lte).values():
            l.merge()
        torch.testing.assert_close(layer.weight, expected, **TOL)  # B' was zero: only B A counts
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_B_prev) == 0
        torch.testing.assert_close(layer.lora_A.detach(), a_before, **TOL)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), **TOL)


def test_batch_not_divisible_by_heads_is_a_clear_error():
    lte = prepare_model(small_net(), LTEConfig(heads=3, rank=2))
    with pytest.raises(
        ValueError, match=r"LTE layer 0\.weight got an input of shape \(4, 6\).*multiple of 3 heads"
    ):
        lte(torch.randn(4, 6, dtype=torch.float64))
    lte.eval()
    assert lte(torch.randn(4, 6, dtype=torch.float64)).shape == (4, 4)  # eval uses W alone


def test_eval_mode_uses_w_alone():
    lte = prepare_model(small_net(), LTEConfig(heads=2, rank=2))
    with torch.no_grad():
        lte[0].lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    lte.eval()
    torch.testing.assert_close(lte[0](x), nn.functional.linear(x, lte[0].weight, lte[0].bias), **TOL)


def test_extra_repr_tells_the_truth():
    layer = LTELinear.from_linear(nn.Linear(768, 3072), LTEConfig(heads=4, rank=64, alpha=4096, quant="int8"))
    assert repr(layer) == "LTELinear(768, 3072, heads=4, r=64, s=64, N=4, quant=int8)"


def test_a_init_semi_orthogonal_scaled_and_distinct_per_head():
    config = LTEConfig(heads=3, rank=4, a_init="semi-orthogonal", head_ids=[5, 6, 7])
    layer = LTELinear.from_linear(nn.Linear(32, 16).double(), config)
    for i in range(3):
        a = layer.lora_A[i].detach()
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64) * (4 / 32), **TOL)
    assert not torch.allclose(layer.lora_A[0], layer.lora_A[1])
    again_config = LTEConfig(heads=1, rank=4, a_init="semi-orthogonal", head_ids=[6])
    again = LTELinear.from_linear(nn.Linear(32, 16).double(), again_config)
    torch.testing.assert_close(again.lora_A[0], layer.lora_A[1], **TOL)  # a head inits the same anywhere


class _EveryKind(nn.Module):
    """One layer of every LTE kind: Linear (fan-in 32), attention projections (24), Conv2d
    (3 x 3 x 3 = 27), Embedding (width 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 16)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.conv = nn.Conv2d(3, 8, 3)
        self.emb = nn.Embedding(50, 20)


@pytest.mark.parametrize("rank", [4, 40])  # r < n everywhere, and r > n everywhere
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_a_init_reference_has_spectral_norm_sqrt_n_over_r_in_every_layer_kind(rank, gain):
    """The authors' scaling (github minyoungg/LTE, reset_lora_parameters): every singular value of
    each head's A [r, n] is sqrt(n / r) (times the gain); n is the fan-in of the layer's matrix."""
    torch.manual_seed(0)
    config = LTEConfig(heads=2, rank=rank, a_init="reference", a_init_gain=gain, head_ids=[3, 9])
    model = prepare_model(_EveryKind().double(), config)
    fan_in = {"fc.weight": 32, "attn.in_proj_weight": 24, "attn.out_proj.weight": 24}
    fan_in |= {"conv.weight": 27, "emb.weight": 20}
    layers = lte_layers(model)
    assert sorted(layers) == sorted(fan_in)  # every kind was converted
    for name, layer in layers.items():
        n = fan_in[name]
        assert tuple(layer.lora_A.shape) == (2, rank, n), name
        for head in range(2):
            sv = torch.linalg.svdvals(layer.lora_A[head].detach())
            expected = torch.full((min(rank, n),), gain * (n / rank) ** 0.5, dtype=torch.float64)
            torch.testing.assert_close(sv, expected, **TOL, msg=name)
        assert not torch.allclose(layer.lora_A[0], layer.lora_A[1])  # each head its own draw
        semi_config = LTEConfig(heads=2, rank=rank, a_init="semi-orthogonal", head_ids=[3, 9])
        semi = prepare_model(_EveryKind().double(), semi_config)
        old = lte_layers(semi)[name].lora_A.detach()
        # the same orthogonal draw as semi-orthogonal, n / r times larger (times the gain)
        torch.testing.assert_close(layer.lora_A.detach(), old * (gain * n / rank), **TOL, msg=name)


def test_strict_conversion_names_uncovered_parameters():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    # the table gets LTE heads and the tied Linear reads them (issue 22): nothing trains full-rank
    tied = prepare_model(Tied(), LTEConfig())
    assert isinstance(tied.out, LTETiedLinear) and tied.out.weight is tied.emb.weight
    assert sorted(replica_parameters(tied)) == []
    # without embedding heads the tied Linear stays plain: its weight is the owner's replica
    tied = prepare_model(Tied(), LTEConfig(embeddings=False))
    assert type(tied.out) is nn.Linear and tied.out.weight is tied.emb.weight
    assert sorted(replica_parameters(tied)) == ["emb.weight"]
    with pytest.raises(ValueError, match=r"0\.bias"):
        prepare_model(small_net(), LTEConfig(replicas=False))
    with pytest.raises(ValueError, match=r"2\.weight \(excluded matrix left trainable\)"):
        prepare_model(small_net(), LTEConfig(exclude=("2",)))
    net = small_net()
    net[2].weight.requires_grad_(False)
    net[2].bias.requires_grad_(False)
    converted = prepare_model(net, LTEConfig(exclude=("2",)))
    assert type(converted[2]) is nn.Linear and isinstance(converted[0], LTELinear)
    assert sorted(replica_parameters(converted)) == ["0.bias"]


def test_replica_deltas_average_with_head_weights():
    plain = small_net()
    master = plain_state_dict(prepare_model(copy.deepcopy(plain), LTEConfig()))
    workers = [prepare_model(copy.deepcopy(plain), LTEConfig(heads=k, total_heads=4)) for k in (1, 3)]
    base = {k: v.clone() for k, v in master.items()}
    for i, w in enumerate(workers):
        with torch.no_grad():
            for p in replica_parameters(w).values():
                p.add_(float(i + 1))
    reps = [
        (k / 4, ReplicaUpdate(k, export_replica_deltas(w, base)))
        for w, k in zip(workers, (1, 3), strict=True)
    ]
    apply_updates(master, {}, [], [], reps, scale=1.0)
    for name in replica_parameters(workers[0]):
        torch.testing.assert_close(master[name], base[name] + (1 * 1 + 3 * 2) / 4, **TOL)


def test_network_style_merge_matches_layer_merge():
    """Export -> apply_updates on master -> load snapshot + commit equals LTELinear.merge."""
    plain = small_net()
    a = prepare_model(copy.deepcopy(plain), LTEConfig(heads=2, rank=2, alpha=4.0))
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    opt_b = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 6, dtype=torch.float64)
    for opt, net in ((opt_a, a), (opt_b, b)):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    for layer in lte_layers(a).values():
        layer.merge()
    master = plain_state_dict(prepare_model(copy.deepcopy(plain), LTEConfig()))
    prev: dict = {}
    updates = [HeadUpdate(i, export_head_factors(b, i)) for i in range(2)]
    deltas = export_replica_deltas(b, master)
    apply_updates(master, prev, updates, [0.5, 0.5], [(1.0, ReplicaUpdate(2, deltas))], scale=2.0)
    load_master_weights(b, master)
    commit_merge(b)
    for (name, la), lb in zip(lte_layers(a).items(), lte_layers(b).values(), strict=True):
        torch.testing.assert_close(lb.weight, la.weight, **TOL, msg=name)
        torch.testing.assert_close(lb.lora_B_prev, la.lora_B_prev, **TOL)


def test_quantized_layer_forward_backward_and_state_dict():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    for kind in ("int8", "nf4"):
        layer = LTELinear.from_linear(lin, LTEConfig(heads=2, rank=4, quant=kind))
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(4, 64, requires_grad=True)
        w_q = quantize(lin.weight.detach(), kind).dequantize()
        y = layer(x)
        xh = x.reshape(2, 2, 64)
        expected = (
            x @ w_q.T + lin.bias + layer.scale * ((xh @ layer.lora_A.mT) @ layer.lora_B.mT).reshape(4, 32)
        )
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        (g,) = torch.autograd.grad(y.sum(), x)
        (g_ref,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
        assert layer.weight is None and "weight_codes" in layer.state_dict()
        clone = LTELinear(64, 32, heads=2, rank=4, quant=kind)
        clone.load_state_dict(layer.state_dict())
        torch.testing.assert_close(clone.base_weight(), layer.base_weight())
        with pytest.raises(RuntimeError, match="cannot merge"):
            layer.merge()


@pytest.mark.slow
def test_low_rank_merges_recover_a_full_rank_target():
    """Merged rank-2 heads reach a full-rank W* that no single rank-2 adapter can (Eckart-Young).

    Reset-less LTE keeps W = W0 + (s/N) sum_i B_i A_i, so it needs N r >= d; the reset variant
    accumulates new directions every merge and goes below the rank-(N r) floor.
    """
    gen = torch.Generator().manual_seed(0)
    d, r = 12, 2
    u, _, v = torch.linalg.svd(torch.randn(d, d, generator=gen, dtype=torch.float64))
    target = u @ torch.diag(torch.linspace(1.0, 2.0, d, dtype=torch.float64)) @ v.T  # full rank
    q, _ = torch.linalg.qr(torch.randn(512, d, generator=gen, dtype=torch.float64))
    x = q * 512**0.5  # exactly white inputs: the MSE of W is ||W - W*||_F^2 / d
    y = x @ target.T
    sv = torch.linalg.svdvals(target)

    def floor(rank: int) -> float:  # MSE of the best rank-`rank` matrix
        return float((sv[rank:] ** 2).sum() / d)

    def train(
        heads: int, merge_every: int | None, reset: bool = False, lr: float = 2e-2, steps: int = 600
    ) -> float:
        lin = nn.Linear(d, d, bias=False).double()
        nn.init.zeros_(lin.weight)
        net = prepare_model(
            nn.Sequential(lin), LTEConfig(heads=heads, rank=r, alpha=2.0, seed=1, reset=reset)
        )
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
        for step in range(steps):
            idx = torch.randint(0, 512, (32,), generator=gen)
            opt.zero_grad()
            ((net(x[idx].repeat(heads, 1)) - y[idx].repeat(heads, 1)) ** 2).mean().backward()
            opt.step()
            if merge_every and (step + 1) % merge_every == 0:
                net[0].merge()
        layer = net[0]
        if merge_every:  # steps is a multiple of merge_every: everything is in W
            w_eff = layer.weight
        else:
            w_eff = layer.weight + layer.scale * (layer.lora_B[0] @ layer.lora_A[0]).detach()
        return float(((x @ w_eff.T - y) ** 2).mean())

    assert train(heads=1, merge_every=None) >= 0.99 * floor(r)  # one adapter: bounded by rank r
    assert train(heads=6, merge_every=5) < 1e-6 * floor(r)  # N r = d: exact recovery
    assert train(heads=2, merge_every=5, reset=True, lr=5e-2) < 0.75 * floor(2 * r)  # beyond rank N r


@pytest.mark.parametrize("rows_per_head", [2, 200])  # below and above m n / (m + n) = 16: per-token vs folded
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_last_merge_term_is_exact_whether_folded_into_w_or_not(rows_per_head, quant):
    torch.manual_seed(0)
    lin = nn.Linear(32, 32).double()
    layer = LTELinear.from_linear(lin, LTEConfig(heads=3, rank=4, alpha=8.0, quant=quant))
    layer.double()
    with torch.no_grad():
        for t in (layer.lora_A, layer.lora_B, layer.lora_A_prev, layer.lora_B_prev):
            t.normal_()
    layer.has_prev = True
    x = torch.randn(3 * rows_per_head, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    xh = x.reshape(3, -1, 32)
    w = layer.base_weight(torch.float64)
    ref = xh @ w.T + layer.scale * (
        (xh @ layer.lora_A.mT) @ layer.lora_B.mT - (xh @ layer.lora_A_prev.mT) @ layer.lora_B_prev.mT
    )
    ref = ref.reshape(-1, 32) + layer.bias
    torch.testing.assert_close(y, ref, **TOL)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.lora_A, layer.lora_B))
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, layer.lora_A, layer.lora_B))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_a_trainer_built_without_its_base_trains_exactly_as_one_built_with_it(quant):
    """A worker builds on the meta device and takes its base from the snapshot: no fp32 model."""
    from lte.common.data.datasets import load_dataset
    from lte.common.job.config import JobConfig
    from lte.common.job.trainer import LocalTrainer, build_job_model, linear_weight_names, make_snapshot

    data = load_dataset("digits", seed=0)
    job = JobConfig(
        model="vit-tiny", dataset="digits", patch_size=4, heads=4, rank=4, quant=quant, merge_every=2
    ).with_dataset(data)
    master = build_job_model(job, seed=7).state_dict()  # not the job seed's init: the snapshot decides
    snapshot = make_snapshot(master, linear_weight_names(build_job_model(job)), quant)
    built = LocalTrainer(job, [1, 3], data, wire_rounded=True)
    lean = LocalTrainer(job, [1, 3], data, wire_rounded=True, base_from_snapshot=True)
    with pytest.raises(RuntimeError, match="load_snapshot first"):
        lean.train_round()
    for trainer in (built, lean):
        trainer.load_snapshot(snapshot)
    for _ in range(2):
        assert built.train_round().train_loss == lean.train_round().train_loss
    a, b = built.model.state_dict(), lean.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_heads_that_continue_mid_job_ramp_their_lr_again_with_fresh_adamw_moments():
    from lte.common.data.datasets import load_dataset
    from lte.common.job.config import JobConfig
    from lte.common.job.trainer import LocalTrainer, lr_at

    data = load_dataset("digits", seed=0)
    job = JobConfig(model="mlp", dataset="digits", heads=2, steps=200, warmup_steps=4, merge_every=2)
    job = job.with_dataset(data)
    fresh = LocalTrainer(job, [0, 1], data)
    moved = LocalTrainer(job, [0, 1], data, steps_done=[100, 100])  # a lost worker's heads, taken over
    seen = []
    for _ in range(3):  # 6 steps: the ramp (4), then the schedule itself
        seen += [moved.lr_now()]
        moved.train_round(1)
        seen += [moved.lr_now()]
        moved.train_round(1)
    schedule = [lr_at(100 + k, job) for k in range(6)]
    assert seen == pytest.approx([s * min(1, (k + 1) / 4) for k, s in enumerate(schedule)], rel=1e-12)
    assert moved.optimizer.param_groups[0]["lr"] == pytest.approx(schedule[5] * 1.0)
    assert fresh.lr_now() == lr_at(0, job)  # a job's first steps already warm up: no second ramp


def test_reset_optimizer_clears_the_adamw_state_exactly_at_merges():
    """``reset_optimizer``: a round trains exactly as without it; each commit (a merge) clears every
    trainable tensor's AdamW state, so the next round is Adam from scratch at the merged point (a
    twin whose optimiser is rebuilt by hand at the merge), and nothing is cleared between merges."""
    data = load_dataset("digits", seed=0)
    base = dict(model="mlp", dataset="digits", heads=2, rank=4, merge_every=3, steps=30, batch_size=16)
    keep_job = JobConfig(**base).with_dataset(data)
    keep, twin = LocalTrainer(keep_job, [0, 1], data), LocalTrainer(keep_job, [0, 1], data)
    reset = LocalTrainer(JobConfig(**base, reset_optimizer=True).with_dataset(data), [0, 1], data)
    trainers = (keep, twin, reset)

    def adam_steps(t: LocalTrainer) -> set[int]:
        return {int(state["step"]) for state in t.optimizer.state.values()}

    def same_weights(a: LocalTrainer, b: LocalTrainer) -> bool:
        x, y = a.model.state_dict(), b.model.state_dict()
        return all(torch.equal(x[k], y[k]) for k in x)

    losses = {t.train_round().train_loss for t in trainers}
    assert len(losses) == 1 and same_weights(keep, reset)  # the first round: no difference at all
    assert adam_steps(keep) == adam_steps(reset) == {3}
    n_tensors = len(keep.optimizer.state)
    for t in trainers:
        t.commit()
    assert len(reset.optimizer.state) == 0  # cleared at the merge ...
    assert adam_steps(keep) == {3} and len(keep.optimizer.state) == n_tensors  # ... only with the option
    twin.optimizer = make_optimizer(trainable_parameters(twin.model), keep_job)  # Adam afresh, by hand
    for _ in range(2):
        assert reset.train_round().train_loss == twin.train_round().train_loss
        assert adam_steps(reset) == {3} and len(reset.optimizer.state) == n_tensors  # kept within a round
        assert same_weights(reset, twin)
        reset.commit()
        twin.commit()
        twin.optimizer = make_optimizer(trainable_parameters(twin.model), keep_job)
    keep.train_round()
    assert adam_steps(keep) == {6} and not same_weights(keep, reset)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_a_cached_frozen_weight_trains_exactly_as_the_rebuilt_one_across_commits(quant):
    """The cache lives for a round: every change of the base or of B', A' must drop it."""
    from lte.common.data.datasets import load_dataset
    from lte.common.job.config import JobConfig
    from lte.common.job.trainer import LocalTrainer, build_job_model, linear_weight_names, make_snapshot

    data = load_dataset("digits", seed=0)
    job = JobConfig(model="mlp", dataset="digits", heads=2, rank=4, quant=quant, merge_every=3, batch_size=64)
    job = job.with_dataset(data)
    plain = build_job_model(job, seed=3)
    names = linear_weight_names(plain)
    rebuilt = LocalTrainer(job, [0, 1], data)
    cached = LocalTrainer(job, [0, 1], data, cache_frozen=True)
    for round_ in range(4):  # a base; a commit alone (B', A' change); a new base (W changes); ...
        if round_ % 2 == 0:
            with torch.no_grad():
                for t in plain.state_dict().values():
                    t.add_(0.01 * round_)
            for trainer in (rebuilt, cached):
                trainer.load_snapshot(make_snapshot(plain.state_dict(), names, quant))
        assert rebuilt.train_round().train_loss == cached.train_round().train_loss
        for trainer in (rebuilt, cached):
            trainer.commit()
    assert rebuilt.train_round().train_loss == cached.train_round().train_loss  # the cache is full
    cached.forget_merges([1])  # a head the server holds no merge of: its B', A' become zero
    rebuilt.forget_merges([1])
    assert rebuilt.train_round().train_loss == cached.train_round().train_loss
    a, b = rebuilt.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(layer.frozen_cache_nbytes for layer in lte_layers(cached.model).values()) > 0
