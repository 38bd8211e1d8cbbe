"""The protocol's vocabulary (common/wire/protocol.py): one home, both sides."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lte.common.core.merge import HeadUpdate, ReplicaUpdate
from lte.common.job.config import JobConfig
from lte.common.job.trainer import LocalTrainer
from lte.common.wire import protocol
from lte.server.service import STATUS_OF
from tests.cluster import DIGITS, digits_job


def test_every_job_field_travels_and_comes_back_equal():
    assert protocol.unmapped_job_fields() == []  # a new JobConfig field needs a proto field of its name
    job = JobConfig(
        heads=3,
        rank=5,
        alpha=7.5,
        quant="nf4",
        uplink="bf16",
        steps=77,
        dtype="float64",
        lr=0.25,
        randaugment_ops=3,
        randaugment_magnitude=14,
        head_data="iid",
        reset_optimizer=True,
    )
    assert protocol.job_from_proto(protocol.job_to_proto(job)) == job


def test_a_snapshot_codec_the_worker_does_not_know_is_refused():
    message = protocol.job_to_proto(JobConfig())
    message.snapshot_codec = "int3"
    with pytest.raises(ValueError, match="unknown snapshot codec 'int3'"):
        protocol.job_from_proto(message)


@pytest.mark.parametrize("layer", ["blocks.0.attn.qkv.weight", "head.weight", "a/b.weight"])
def test_tensor_names_parse_back(layer):
    for part in "BA":
        parsed = protocol.parse_tensor_name(protocol.head_tensor_name(12, layer, part))
        assert (parsed.kind, parsed.head_id, parsed.name, parsed.part) == ("head", 12, layer, part)
    assert protocol.parse_tensor_name(protocol.replica_tensor_name(layer)).name == layer
    for bad in ("head/x/w/B", "head/1/w/C", "head/1/B", "replica/", "weights"):
        with pytest.raises(ValueError):
            protocol.parse_tensor_name(bad)


def test_an_update_encodes_with_the_codec_policy_and_decodes_whole():
    job = JobConfig(uplink="fp16")
    b, a = torch.randn(4, 2), torch.randn(2, 3)
    heads = [HeadUpdate(5, {"l.weight": (b, a)})]
    replica = ReplicaUpdate(1, {"l.bias": torch.randn(4)})
    encoded = list(protocol.encode_update(heads, replica, job))
    assert [(e.name, e.codec) for e in encoded] == [
        ("head/5/l.weight/B", "fp16"),
        ("head/5/l.weight/A", "fp16"),
        ("replica/l.bias", "fp32"),  # replicas stay exact
    ]
    from lte.common.wire.codec import decode_tensor

    tensors = {e.name: decode_tensor(e).float() for e in encoded}
    got_heads, got_replica = protocol.decode_update(tensors, [5], ["l.weight"], ["l.bias"])
    assert torch.equal(got_heads[0].factors["l.weight"][0], b.half().float())
    assert torch.equal(got_replica.deltas["l.bias"], replica.deltas["l.bias"])
    assert protocol.group_head_factors(tensors) == {
        5: {"l.weight": (tensors["head/5/l.weight/B"], tensors["head/5/l.weight/A"])}
    }


def test_every_refusal_has_a_status_code_and_travels_by_name():
    assert set(STATUS_OF) == set(protocol.Refusal)
    for reason in protocol.Refusal:
        assert protocol.refusal_of([("x", "y"), (protocol.REFUSAL_KEY, reason.value)]) is reason
    assert protocol.refusal_of([(protocol.REFUSAL_KEY, "no-such-reason")]) is None
    assert protocol.REREGISTER.isdisjoint(protocol.RESYNC)


def test_keep_heads_carries_the_kept_heads_factors_and_adamw_moments_exactly():
    from lte.common.core.model_state import lte_layers

    job = dataclasses.replace(digits_job(heads=3, steps=40), dtype="float64")
    trainer = LocalTrainer(job, [0, 1, 2], DIGITS)
    trainer.train_round()
    trainer.commit()
    trainer.train_round()  # B != B', moments non-zero
    layers = lte_layers(trainer.model)
    kept = [0, 2]
    expected = {}
    for name, layer in layers.items():
        for attr in ("lora_A", "lora_B", "lora_A_prev", "lora_B_prev"):
            expected[name, attr] = getattr(layer, attr).detach()[kept].clone()
        for attr in ("lora_A", "lora_B"):
            state = trainer.optimizer.state[getattr(layer, attr)]
            for key in ("exp_avg", "exp_avg_sq"):
                expected[name, attr, key] = state[key][kept].clone()
            expected[name, attr, "step"] = state["step"].clone()
    trainer.keep_heads(kept)
    assert trainer.head_ids == [0, 2] and trainer.steps_done == [20, 20] and len(trainer.streams) == 2
    for name, layer in lte_layers(trainer.model).items():
        assert layer.heads == 2
        for attr in ("lora_A", "lora_B", "lora_A_prev", "lora_B_prev"):
            assert torch.equal(getattr(layer, attr), expected[name, attr]), (name, attr)
        for attr in ("lora_A", "lora_B"):
            state = trainer.optimizer.state[getattr(layer, attr)]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state[key], expected[name, attr, key]), (name, attr, key)
    stats = trainer.train_round()  # and it trains on with the smaller stack
    assert stats.samples == 2 * job.merge_every * job.batch_size
    with pytest.raises(ValueError, match="distinct local heads"):
        trainer.keep_heads([1, 1])
