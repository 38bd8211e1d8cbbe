"""Mixed precision of the local steps (issue 14): precision choice, bf16/fp16 autocast on the CPU,
fp32 factors and optimiser state, and the frozen-weight cache's invalidation, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from lte.commands.sim import main as sim_main
from lte.common.core.layers import LTELinear
from lte.common.core.model_state import load_head_factors, lte_layers
from lte.common.core.quant import quantize
from lte.common.data.datasets import load_dataset
from lte.common.job.config import JobConfig
from lte.common.job.precision import MixedPrecision, resolve_precision
from lte.common.job.trainer import LocalTrainer, build_job_model, linear_weight_names, make_snapshot


def test_auto_is_fp32_on_the_cpu_and_names_are_checked():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        JobConfig(precision="half")
    with pytest.raises(ValueError, match="autocasts float32 only"):
        JobConfig(dtype="float64", precision="bf16")


def test_a_worker_precision_the_job_dtype_cannot_take_is_refused_by_name():
    data = load_dataset("digits", seed=0)
    job = JobConfig(model="mlp", dataset="digits", heads=1, dtype="float64").with_dataset(data)
    with pytest.raises(ValueError, match="autocasts float32 only.*--precision fp32"):
        LocalTrainer(job, [0], data, precision="bf16")


def _trainer(precision: str, quant: str = "int8", **kwargs) -> LocalTrainer:
    data = load_dataset("digits", seed=0)
    job = JobConfig(model="mlp", dataset="digits", heads=2, rank=8, alpha=16, quant=quant, merge_every=4)
    job = job.with_dataset(data)
    trainer = LocalTrainer(job, [0, 1], data, precision=precision, **kwargs)
    plain = build_job_model(job, seed=1)
    trainer.load_snapshot(make_snapshot(plain.state_dict(), linear_weight_names(plain), quant))
    return trainer


def test_auto_on_the_cpu_trains_bit_identically_to_fp32_without_the_cache():
    auto, fp32 = _trainer("auto"), _trainer("fp32", cache_frozen=False)
    assert auto.precision.precision == "fp32" and not auto.cache_frozen  # cache: CUDA only by default
    assert auto.train_round().train_loss == fp32.train_round().train_loss
    a, b = auto.model.state_dict(), fp32.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.0039); products accumulate in fp32. One
# round of 4 steps from the same start: the loss within 2 %, the factors within 3 % of their norm.
BF16_LOSS_RTOL, BF16_FACTOR_RTOL = 0.02, 0.03


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_bf16_autocast_on_the_cpu_matches_fp32_within_the_stated_tolerance(quant):
    fp32, bf16 = _trainer("fp32", quant), _trainer("bf16", quant)
    loss32, loss16 = fp32.train_round().train_loss, bf16.train_round().train_loss
    assert loss16 == pytest.approx(loss32, rel=BF16_LOSS_RTOL)
    moved = 0.0
    for name, layer in lte_layers(fp32.model).items():
        other = lte_layers(bf16.model)[name]
        assert other.lora_A.dtype == other.lora_B.dtype == torch.float32  # factors stay fp32
        for p32, p16, start in ((layer.lora_B, other.lora_B, 0.0), (layer.lora_A, other.lora_A, None)):
            err = (p16 - p32).norm() / p32.norm()
            assert err < BF16_FACTOR_RTOL, (name, float(err))
            if start is not None:
                moved += float(p32.detach().norm())
    assert moved > 0  # B left zero: the round trained
    states = [v for s in bf16.optimizer.state.values() for v in s.values() if v.dim() > 0]
    assert states and all(v.dtype == torch.float32 for v in states)  # AdamW moments in fp32


def test_bf16_autocast_really_lowers_the_products():
    """Same layer, same input: bf16 autocast differs from fp32 (it ran in bf16), within tolerance."""
    torch.manual_seed(0)
    layer = LTELinear(64, 48, bias=False, heads=2, rank=8, alpha=16.0, quant="int8")
    layer.set_base_weight(torch.randn(48, 64) * 0.1)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.1)
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(16, 64)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    err = float((y16.float() - y32).detach().norm() / y32.detach().norm())
    assert 0 < err < 1e-2


def test_fp16_steps_are_loss_scaled_and_keep_fp32_state():
    fp16 = _trainer("fp16")
    assert fp16.precision.scaler is not None
    before = {k: v.clone() for k, v in fp16.model.state_dict().items() if k.endswith("lora_B")}
    stats = fp16.train_round()
    assert stats.train_loss == pytest.approx(_trainer("fp32").train_round().train_loss, rel=0.02)
    assert fp16.precision.scaler.get_scale() > 1.0  # gradients were scaled up (65536 to start)
    after = fp16.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # steps were not all skipped
    for layer in lte_layers(fp16.model).values():
        assert layer.lora_A.dtype == torch.float32


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_halved():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mp = MixedPrecision("fp16", "cpu")
    start = model.weight.detach().clone()
    with mp.autocast():
        loss = model(torch.full((2, 4), 1e30)).float().sum()  # inf in fp16
    scale = mp.scaler.get_scale()
    mp.step(loss, opt)
    assert torch.equal(model.weight, start)
    assert mp.scaler.get_scale() == scale / 2


def test_lte_sim_takes_precision_and_refuses_a_bad_one(capsys):
    args = ["--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "4", "--merge-every", "2"]
    assert sim_main([*args, "--precision", "bf16", "--quiet"]) == 0
    assert "precision=bf16" in capsys.readouterr().out
    assert sim_main([*args, "--precision", "bf16", "--dtype", "float64", "--quiet"]) == 2
    assert "autocasts float32 only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        sim_main([*args, "--precision", "fp8"])
    assert exit_.value.code == 2


# -- the frozen-weight cache: dropped exactly when the base or B', A' change --------------------
def _layer_pair(quant: str) -> tuple[LTELinear, LTELinear]:
    torch.manual_seed(0)
    cached = LTELinear(12, 10, heads=2, rank=3, alpha=6.0, quant=quant, dtype=torch.float64)
    cached.set_base_weight(torch.randn(10, 12, dtype=torch.float64))
    with torch.no_grad():
        cached.lora_A.normal_()
        cached.lora_B.normal_()
    cached.commit()  # B', A' nonzero: the fold is in the cached weight
    plain = copy.deepcopy(cached)
    cached.cache_frozen = True
    return cached, plain


def _out(layer: LTELinear, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    y.sum().backward()  # backward reads the frozen weight too
    return y.detach()


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_cache_is_invalidated_exactly_when_the_base_or_the_last_merged_factors_change(quant):
    cached, plain = _layer_pair(quant)
    x = torch.randn(40, 12, dtype=torch.float64)  # 20 rows per head: folded (20 * 22 >= 120)
    assert torch.equal(_out(cached, x), _out(plain, x))
    (entry,) = cached._frozen_cache.values()
    assert entry.shape == (2, 10, 12)
    for layer in (cached, plain):  # a step changes A, B and the bias, never the frozen weight
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert torch.equal(_out(cached, x), _out(plain, x))
    assert next(iter(cached._frozen_cache.values())) is entry  # kept: not rebuilt within the round

    w_new = torch.randn(10, 12, dtype=torch.float64)
    bp, ap = torch.randn(2, 10, 3, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    mutations = {
        "set_base_weight": lambda m: m.set_base_weight(w_new if quant == "none" else quantize(w_new, quant)),
        "commit": lambda m: m.commit(),
        "load_state_dict": lambda m: m.load_state_dict(
            {**m.state_dict(), "lora_B_prev": bp, "lora_A_prev": ap}
        ),
        "to": lambda m: m.to(torch.device("cpu")),  # _apply: a move may re-home the buffers
        "load_head_factors": lambda m: load_head_factors(  # a head moved here from another worker
            torch.nn.Sequential(m), 1, {"0.weight": (bp[0], ap[0])}, {"0.weight": (bp[1], ap[1])}
        ),
    }
    for name, mutate in mutations.items():
        for layer in (cached, plain):
            mutate(layer)
        assert not cached._frozen_cache, f"{name} kept the cache"
        assert torch.equal(_out(cached, x), _out(plain, x)), name
        assert cached._frozen_cache and next(iter(cached._frozen_cache.values())) is not entry, name
        entry = next(iter(cached._frozen_cache.values()))
    assert cached.frozen_cache_nbytes == 2 * 10 * 12 * 8


def test_the_job_carries_its_precision_to_the_worker_and_the_worker_flag_parses():
    from lte.server.service import job_to_proto
    from lte.worker.cli import build_parser
    from lte.worker.client import job_from_proto

    job = JobConfig(precision="fp16")
    assert job_from_proto(job_to_proto(job)) == job
    old = job_to_proto(JobConfig())
    old.ClearField("precision")  # a server from before the field: the worker's default
    assert job_from_proto(old).precision == "auto"
    args = build_parser().parse_args(["--server", "h:1", "--precision", "bf16", "--no-frozen-cache"])
    assert (args.precision, args.frozen_cache) == ("bf16", False)
    args = build_parser().parse_args(["--server", "h:1"])
    assert (args.precision, args.frozen_cache) == (None, None)  # the job's; the device's default


@pytest.mark.process
@pytest.mark.server
def test_sync_over_the_network_in_bf16_reproduces_the_emulator_in_bf16(tmp_path):
    """The job's precision reaches the worker processes: same bits as lte-sim with bf16 autocast."""
    from lte.commands.sim import run_lte
    from tests.cluster import DIGITS, digits_job, running_server, worker_processes

    job = digits_job(heads=2, steps=12, uplink="fp32", quant="int8", precision="bf16")
    expected = run_lte(job, DIGITS, workers=1).master
    fp32 = run_lte(digits_job(heads=2, steps=12, uplink="fp32", quant="int8"), DIGITS, workers=1).master
    with running_server(job, heads_per_worker=2) as server:
        with worker_processes(server.address, [["--quiet"]], log_dir=tmp_path):
            assert server.wait_done(timeout=240)
        got = server.coordinator.plain_state()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert any(not torch.equal(expected[n], fp32[n]) for n in expected)  # bf16 did change the result


def test_a_round_reports_the_cache_it_holds():
    cached, plain = _trainer("bf16", cache_frozen=True), _trainer("bf16", cache_frozen=False)
    stats = cached.train_round()
    layers = lte_layers(cached.model).values()
    assert stats.frozen_cache_bytes == sum(layer.frozen_cache_nbytes for layer in layers) > 0
    # one bf16 [m, n] per layer: before the first merge B'A' is zero, so the heads share W
    assert stats.frozen_cache_bytes == sum(layer.out_features * layer.in_features * 2 for layer in layers)
    assert plain.train_round().frozen_cache_bytes == 0


def test_in_bf16_the_cached_frozen_weight_trains_bit_for_bit_as_the_rebuilt_one():
    """The CUDA default (bf16 and the cache), checked on the CPU across commits and a new base."""
    cached, rebuilt = _trainer("bf16", cache_frozen=True), _trainer("bf16", cache_frozen=False)
    data_job = cached.job
    plain = build_job_model(data_job, seed=5)
    for round_ in range(3):
        assert cached.train_round().train_loss == rebuilt.train_round().train_loss, round_
        assert cached.frozen_cache_bytes > 0 and rebuilt.frozen_cache_bytes == 0
        for trainer in (cached, rebuilt):
            trainer.commit()  # B', A' change: the cache must go
        assert cached.frozen_cache_bytes == 0
        if round_ == 1:
            for trainer in (cached, rebuilt):  # a new base version
                trainer.load_snapshot(make_snapshot(plain.state_dict(), linear_weight_names(plain), "int8"))
    a, b = cached.model.state_dict(), rebuilt.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cast_traffic():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "cast_traffic.py"
    spec = importlib.util.spec_from_file_location("cast_traffic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_under_autocast_an_lte_layer_moves_only_its_bias_pass_and_gradient_sum_over_nn_linear():
    """The output stays in the compute dtype (a bf16 layer output, as nn.Linear's, not fp32 by type
    promotion with the fp32 bias) and an fp32 input is cast once for both products: over
    nn.Linear of its shape, an LTE layer whose B'A' is zero copies and adds only the bias, added
    in its own pass (rows x m), and the sum of its two input gradients (rows x n). Activations
    only: nn.Linear's weight cast and its gradient's are not counted (at 1576 rows they are as
    large as activations, and made the LTE layer look cheaper than nn.Linear)."""
    bench = _cast_traffic()
    rows, n, m = 1576, 768, 3072
    _, linear, linear_dtype = bench.activation_traffic(torch.nn.Linear(n, m), rows, torch.bfloat16)
    _, lte, lte_dtype = bench.activation_traffic(bench.lte_layer(n, m, 64, False), rows, torch.bfloat16)
    assert lte_dtype == linear_dtype == torch.bfloat16
    assert 0 < linear < lte <= linear + rows * (m + n), (lte, linear)
    # and in fp32 (no autocast) the layer is what it was: fp32 out, the same values as the reference
    layer = bench.lte_layer(64, 32, 8, True)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-5, atol=1e-6)


def test_under_autocast_the_losses_keep_the_targets_and_mixing_weights_in_fp32():
    """An LTE layer's output is bf16 under autocast (as nn.Linear's): the regression target and the
    mixup/cutmix weights must not be rounded to it (MSE and cross-entropy run in fp32 there)."""
    from lte.common.data.mixing import mixed_loss
    from lte.common.job.trainer import loss_fn

    gen = torch.Generator().manual_seed(0)
    layer = LTELinear(16, 8, heads=1, rank=4)
    layer.set_base_weight(torch.randn(8, 16, generator=gen))
    x, target = torch.randn(32, 16, generator=gen), torch.randn(32, 8, generator=gen)
    y, partner = torch.randint(0, 8, (32,), generator=gen), torch.randint(0, 8, (32,), generator=gen)
    lam = torch.full((32,), 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.train()(x)
        regression = loss_fn("regression", out, target)
        mixed = mixed_loss(out, y, partner, lam, 0.0)
    assert out.dtype == torch.bfloat16
    logits = out.float()
    assert torch.equal(regression, torch.nn.functional.mse_loss(logits, target))
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    ce_partner = torch.nn.functional.cross_entropy(logits, partner, reduction="none")
    assert torch.equal(mixed, (lam * ce + (1 - lam) * ce_partner).mean())
