"""Language models: GPT zoo models, the LTE embedding and its tie, token data, lte-prepare-text, lte-sim."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lte.commands.prepare_text import main as prepare_main
from lte.commands.sim import main as sim_main
from lte.commands.sim import run_full, run_lte
from lte.common.core.layers import LTEConfig, LTEEmbedding
from lte.common.core.policy import prepare_model
from lte.common.data.text import (
    BPETokenizer,
    ByteTokenizer,
    TokenBatches,
    load_text,
    load_tokenizer,
    write_token_files,
)
from lte.common.job.config import JobConfig
from lte.common.job.models import GPT, GPTConfig, build_model
from lte.common.job.trainer import build_job_model, evaluate

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. Caf\u00e9 na\u00efve \u2014 \u00fcber \U0001f600. "
) * 40


def tiny_gpt(vocab: int = 64, context: int = 12, dtype=torch.float64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, context=context, width=16, depth=2, num_heads=2)).to(dtype)


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes")
    write_token_files(folder, [TEXT], ByteTokenizer())
    return folder


def tiny_job(folder, **kw) -> JobConfig:
    values = dict(
        model="gpt-micro", dataset="text", context=16, heads=4, rank=4, alpha=16.0, merge_every=2,
        steps=6, batch_size=2, lr=1e-2, dtype="float64", seed=3,
    )  # fmt: skip
    values.update(kw)
    return JobConfig(**values).with_dataset(load_text(str(folder), eval_tokens=256))


# -- tokenizers and token files ----------------------------------------------------------------
def test_byte_level_round_trip(byte_data):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(TEXT)) == TEXT
    data = load_text(str(byte_data))
    meta = json.loads((byte_data / "meta.json").read_text())
    assert (data.vocab_size, meta["dtype"], data.tokenizer_id) == (256, "uint16", "bytes")
    assert isinstance(data.train_tokens, np.memmap) and isinstance(data.val_tokens, np.memmap)
    joined = np.concatenate([np.asarray(data.train_tokens), np.asarray(data.val_tokens)])
    assert tok.decode(joined.tolist()) == TEXT
    assert data.bytes_per_token == 1.0


def test_bpe_round_trip(tmp_path):
    tok = BPETokenizer.train([TEXT], vocab_size=300)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges happened
    write_token_files(tmp_path, [TEXT], tok)
    data = load_text(str(tmp_path))
    assert data.tokenizer_id == tok.id and data.tokenizer_id.startswith("bpe:")
    again = load_tokenizer(tmp_path)
    joined = np.concatenate([np.asarray(data.train_tokens), np.asarray(data.val_tokens)]).tolist()
    assert again.decode(joined) == TEXT
    assert data.bytes_per_token > 1.0


def test_uint32_for_large_vocabularies():
    from lte.common.data.text import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_windows_are_a_pure_function_of_seed_head_step(byte_data):
    data = load_text(str(byte_data))
    a = TokenBatches(data.train_tokens, 2, 4, 5, seed=7, context=16)
    b = TokenBatches(data.train_tokens, 2, 4, 5, seed=7, context=16)
    x1, y1 = a.batch(3)
    a.batch(0), a.batch(9)  # reading other steps first changes nothing
    x2, y2 = b.batch(3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (5, 16) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one token
    other = TokenBatches(data.train_tokens, 3, 4, 5, seed=7, context=16)
    assert not torch.equal(other.batch(3)[0], x1)
    assert not torch.equal(a.batch(4)[0], x1)


def test_prepare_text_cli(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TEXT, encoding="utf-8")
    assert prepare_main([str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * load_text(
        str(tmp_path / "out")
    ).train_tokens.size
    assert prepare_main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o2")]) == 2
    assert "missing.txt: no such text file" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00abc")
    assert prepare_main([str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o3")]) == 2
    assert "not UTF-8" in capsys.readouterr().err


# -- the model ------------------------------------------------------------------------------------
def test_zoo_sizes():
    with torch.device("meta"):
        small = build_model("gpt2-small", image_size=0, in_channels=0, num_classes=50257)
        micro = build_model("gpt-micro", image_size=0, in_channels=0, num_classes=256)
    n = sum(p.numel() for p in small.parameters())
    assert 124_000_000 < n < 124_600_000  # GPT-2 small: 124M with the tie
    assert small.tok_embed.weight.shape == (50257, 768)
    assert micro.config.context == 128 and len(micro.blocks) == 4


@pytest.mark.parametrize("lte", [False, True])
def test_causal_mask_future_tokens_never_change_earlier_logits(lte):
    model = tiny_gpt()
    if lte:
        prepare_model(model, LTEConfig(heads=2, rank=4, alpha=8.0))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)  # B != 0: the heads' terms take part
        model.train()
    else:
        model.eval()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 5) % 64
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


# -- the LTE embedding and the tie -----------------------------------------------------------------
def test_lte_embedding_lookup_and_attend_use_one_weight_per_head():
    torch.manual_seed(0)
    emb = LTEEmbedding(11, 6, heads=2, total_heads=2, rank=3, alpha=6.0, dtype=torch.float64)
    emb.weight.normal_()
    for t in (emb.lora_A, emb.lora_B, emb.lora_A_prev, emb.lora_B_prev):
        t.data.normal_()
    emb.has_prev = True
    emb.train()
    ids = torch.randint(0, 11, (4, 5))
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    look, logits = emb(ids), emb.attend(x)
    for i in range(2):
        w_i = emb.weight + emb.scale * (
            emb.lora_B[i] @ emb.lora_A[i] - emb.lora_B_prev[i] @ emb.lora_A_prev[i]
        )
        rows = slice(2 * i, 2 * i + 2)
        torch.testing.assert_close(look[rows], w_i[ids[rows]])
        torch.testing.assert_close(logits[rows], x[rows] @ w_i.T)


def test_lte_embedding_merge_then_every_head_computes_new_w():
    torch.manual_seed(0)
    emb = LTEEmbedding(9, 4, heads=3, total_heads=3, rank=2, alpha=4.0, dtype=torch.float64)
    emb.weight.normal_()
    emb.reset_parameters(head_ids=[0, 1, 2], seed=1)
    emb.lora_B.data.normal_()
    w0 = emb.weight.clone()
    expected = w0 + (emb.scale / 3) * sum(emb.lora_B[i] @ emb.lora_A[i] for i in range(3))
    emb.merge()
    torch.testing.assert_close(emb.weight, expected)
    emb.train()
    ids = torch.arange(9).repeat(3, 1)
    torch.testing.assert_close(emb(ids), expected[ids])  # delta term is zero right after a merge


def test_t1_lookup_mean_over_heads_equals_multihead_lora():
    """docs/design.md section 2 for the table: with every head on the same batch and B' = 0, the mean head's lookup
    is multi-head LoRA's, (W + (s/N) sum_i B_i A_i)[t]."""
    torch.manual_seed(0)
    emb = LTEEmbedding(13, 5, heads=4, total_heads=4, rank=2, alpha=4.0, dtype=torch.float64)
    emb.weight.normal_()
    emb.reset_parameters(head_ids=range(4), seed=2)
    emb.lora_B.data.normal_()
    emb.train()
    ids = torch.randint(0, 13, (1, 7))
    mean = emb(ids.repeat(4, 1)).mean(0)
    lora = emb.weight + (emb.scale / 4) * (emb.lora_B @ emb.lora_A).sum(0)
    torch.testing.assert_close(mean, lora[ids[0]])


@pytest.mark.slow
def test_tie_survives_training_merge_and_export(byte_data, tmp_path):
    job = tiny_job(byte_data)
    result = run_lte(job, load_text(str(byte_data), eval_tokens=256))
    master = result.master
    assert "tok_embed.weight" in master
    assert not any(k.endswith("head.weight") or k.startswith("lm_head") for k in master)
    assert sum(t.shape == (256, 128) for t in master.values()) == 1  # the [V, D] table travels once
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in master.items()}, str(path))
    loaded = load_file(str(path))
    model = GPT(GPTConfig(vocab_size=256, context=16, width=128, depth=4, num_heads=4)).double()
    model.load_state_dict(loaded, strict=True)
    model.eval()
    ids = torch.randint(0, 256, (2, 16))
    h = model.norm(_hidden(model, ids))
    torch.testing.assert_close(model(ids), h @ model.tok_embed.weight.T)  # the output layer is the table
    # and the export's loss equals the emulator's evaluation of its master
    data = load_text(str(byte_data), eval_tokens=256)
    assert evaluate(model, data)["test_loss"] == pytest.approx(result.test_loss, rel=1e-12)


def _hidden(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    x = model.tok_embed(ids) + model.pos_embed[: ids.shape[1]]
    for block in model.blocks:
        x = block(x)
    return x


@pytest.mark.slow
def test_embedding_heads_move_the_table_and_replicas_do_not_need_them(byte_data):
    job = tiny_job(byte_data, steps=2, merge_every=2)
    data = load_text(str(byte_data), eval_tokens=256)
    init = build_job_model(job).state_dict()["tok_embed.weight"].clone()
    with_heads = run_lte(job, data).master["tok_embed.weight"]
    as_replica = run_lte(dataclasses.replace(job, embedding_heads=False), data).master["tok_embed.weight"]
    assert not torch.equal(with_heads, init) and not torch.equal(as_replica, init)
    delta_rank = torch.linalg.matrix_rank(with_heads - init).item()
    assert delta_rank <= job.heads * job.rank  # one merge of N heads of rank r: rank <= N r
    assert torch.linalg.matrix_rank(as_replica - init).item() > job.heads * job.rank


# -- lte-sim ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sim_runs_are_bit_identical(byte_data):
    job = tiny_job(byte_data)
    data = load_text(str(byte_data), eval_tokens=256)
    one, two = (
        run_lte(job, data, workers=2),
        run_lte(job, load_text(str(byte_data), eval_tokens=256), workers=2),
    )
    for k in one.master:
        assert torch.equal(one.master[k], two.master[k]), k
    assert one.history[-1]["perplexity"] == pytest.approx(np.exp(one.test_loss))
    assert one.history[-1]["bits_per_byte"] == pytest.approx(one.test_loss / np.log(2))


@pytest.mark.slow
def test_lte_sim_cli_text(byte_data, capsys):
    base = ["--model", "gpt-micro", "--dataset", "text", "--data-dir", str(byte_data), "--context", "16"]
    base += ["--heads", "2", "--rank", "4", "--steps", "4", "--merge-every", "2", "--batch-size", "2"]
    assert sim_main([*base, "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["test_loss"] < np.log(256) + 0.5 and out["perplexity"] > 1 and out["bits_per_byte"] > 0
    assert sim_main([*base, "--full", "--json", "--quiet"]) == 0
    capsys.readouterr()
    assert sim_main([*base, "--quiet"]) == 0  # the text summary names the split as lte-server does
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"perplexity [\d.]+, bits per byte [\d.]+, val loss [\d.]+, \d+ samples", summary), (
        summary
    )
    assert sim_main(["--model", "gpt-micro", "--dataset", "text", "--quiet"]) == 2
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_full_training_learns(byte_data):
    job = tiny_job(byte_data, steps=30, merge_every=5, lr=3e-3, batch_size=4, dtype="float32")
    data = load_text(str(byte_data), eval_tokens=256)
    result = run_full(job, data)
    assert result.test_loss < 0.8 * np.log(256)


# -- over a real lte-server ---------------------------------------------------------------------
@pytest.mark.process
@pytest.mark.server
def test_sync_over_the_network_reproduces_the_emulator_and_the_export_evaluates_the_same(byte_data, tmp_path):
    from lte.server.coordinator import Coordinator
    from lte.server.grpc_server import ParameterServer
    from tests.cluster import worker_processes

    job = tiny_job(byte_data, dtype="float32", uplink="fp32", steps=4, heads=4)
    data = load_text(str(byte_data), eval_tokens=256)
    expected = run_lte(job, data, workers=2).master
    coordinator = Coordinator(job, data, heads_per_worker=2)
    server = ParameterServer(coordinator, host="127.0.0.1", port=0).start()
    try:
        # workers train with this process's thread count: a plain layer's weight gradient sums in
        # per-thread blocks, so a different count changes the last bits
        threads = ["--threads", str(torch.get_num_threads())]
        extra = ["--quiet", "--max-heads", "2", "--data-dir", str(byte_data), *threads]
        with worker_processes(server.address, [extra] * 2, log_dir=tmp_path):
            assert server.wait_done(timeout=240), "job did not finish in time; see worker logs"
        got = coordinator.plain_state()
        for name, value in expected.items():
            assert torch.equal(got[name], value), name  # bit for bit, the tied table included
        record = coordinator.evaluate_now()
        path = coordinator.export(tmp_path / "export" / "model.safetensors")
    finally:
        server.stop(grace=0.5)
    assert isinstance(record["sample"], str) and len(record["sample"]) > 0
    assert record["perplexity"] == pytest.approx(np.exp(record["test_loss"]))
    assert load_tokenizer(path.parent).id == "bytes"  # the tokenizer travels beside the weights
    model = build_job_model(job, seed=99)
    model.load_state_dict(load_file(str(path)), strict=True)
    assert evaluate(model, data)["test_loss"] == record["test_loss"]  # the export's loss is the server's


@pytest.mark.process
def test_lte_server_ends_with_the_validation_scores_and_an_export_that_lte_generate_reads(
    byte_data, tmp_path
):
    # make lm-cluster's shape, tiny: lte-server with a local worker, then README's lte-generate line
    bin_dir = os.path.dirname(sys.executable)
    env = dict({k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}, OMP_NUM_THREADS="1")
    job = ["--model", "gpt-micro", "--dataset", "text", "--data-dir", str(byte_data), "--context", "16"]
    job += ["--heads", "2", "--rank", "4", "--steps", "4", "--merge-every", "2", "--batch-size", "2"]
    job += ["--local-workers", "1", "--port", "0", "--dashboard-port", "-1", "--out", "run"]
    run = functools.partial(
        subprocess.run, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    server = run([os.path.join(bin_dir, "lte-server"), *job])
    assert server.returncode == 0, server.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    line = (
        f"val loss {summary['test_loss']:.4f}, perplexity {summary['perplexity']:.2f}, "
        f"{summary['bits_per_byte']:.3f} bits/byte, "
    )
    assert re.search(r"done: version 2, " + re.escape(line), server.stderr), server.stderr[-2000:]
    gen = [
        os.path.join(bin_dir, "lte-generate"),
        "--model",
        "run/model.safetensors",
        "--prompt",
        "And God said",
    ]
    out = run([*gen, "--max-new-tokens", "20"])
    assert out.returncode == 0 and out.stdout.startswith("And God said"), out.stderr


@pytest.mark.slow
def test_lte_generate_samples_from_an_lte_sim_export(byte_data, tmp_path, capsys):
    from lte.commands.generate import load_exported
    from lte.commands.generate import main as generate_main

    out = tmp_path / "run" / "model.safetensors"
    base = ["--model", "gpt-micro", "--dataset", "text", "--data-dir", str(byte_data), "--context", "16"]
    base += ["--heads", "2", "--rank", "4", "--steps", "2", "--merge-every", "2", "--batch-size", "2"]
    assert sim_main([*base, "--quiet", "--export", str(out)]) == 0
    capsys.readouterr()
    model, tok = load_exported(out)
    assert tok.id == "bytes" and not any(isinstance(m, LTEEmbedding) for m in model.modules())
    args = ["--model", str(out), "--prompt", "In the", "--max-new-tokens", "20", "--seed", "1"]
    assert generate_main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("In the") and len(first.encode()) >= len("In the") + 1
    assert generate_main(args) == 0
    assert capsys.readouterr().out == first  # seeded: the same text again
    assert generate_main([*args[:4], "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert generate_main(["--model", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such model file" in capsys.readouterr().err


class _FactoryLM(torch.nn.Module):
    """A user's language model that returns a tuple or a dict: token and learned position tables
    (``context`` positions: a longer window fails), a head over the vocabulary."""

    def __init__(self, vocab_size: int, context: int, output: str):
        super().__init__()
        self.output = output
        self.embed = torch.nn.Embedding(vocab_size, 16)
        self.pos = torch.nn.Parameter(torch.zeros(context, 16))
        self.head = torch.nn.Linear(16, vocab_size)

    def forward(self, ids: torch.Tensor):
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # [B, L, 16]; L > context: a shape error
        logits = self.head(torch.tanh(h))
        return (logits, h) if self.output == "tuple" else {"hidden": h, "logits": logits}


def tuple_lm(vocab_size: int, context: int) -> torch.nn.Module:
    return _FactoryLM(vocab_size, context, "tuple")


def dict_lm(vocab_size: int, context: int) -> torch.nn.Module:
    return _FactoryLM(vocab_size, context, "dict")


@pytest.mark.parametrize("factory", ["tuple_lm", "dict_lm"])
def test_lte_generate_samples_from_a_factory_lm_returning_a_tuple_or_a_dict(
    factory, byte_data, tmp_path, capsys
):
    """lte-generate refused every export but the zoo GPT's ("lte-generate needs a GPT")."""
    from lte.commands.generate import load_exported
    from lte.commands.generate import main as generate_main
    from lte.common.core.outputs import generate_tokens

    out = tmp_path / "run" / "model.safetensors"
    base = ["--model", f"tests.test_lm:{factory}", "--dataset", "text", "--data-dir", str(byte_data)]
    base += ["--context", "16", "--heads", "2", "--rank", "4", "--steps", "2", "--merge-every", "2"]
    assert sim_main([*base, "--batch-size", "2", "--quiet", "--export", str(out)]) == 0
    capsys.readouterr()
    # 30 new tokens: past the 16 positions, so only the job's context windows can produce them
    args = ["--model", str(out), "--prompt", "In the", "--max-new-tokens", "30", "--seed", "1"]
    assert generate_main(args) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    model, tok = load_exported(out)
    assert isinstance(model, _FactoryLM) and not model.training
    prompt = torch.tensor([tok.encode("In the")])
    expected = generate_tokens(model, prompt, 30, context=16, temperature=0.8, top_k=40,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert expected.shape == (1, 6 + 30) and text == tok.decode(expected[0].tolist()) + "\n"
    with torch.no_grad():
        output = model(prompt)
    logits = output[0] if factory == "tuple_lm" else output["logits"]
    greedy = generate_tokens(model, prompt, 3, context=16, temperature=0)
    assert int(greedy[0, 6]) == int(logits[0, -1].argmax())  # the logits, not the hidden state
    assert generate_main([*args[:4], "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == tok.decode(greedy[0].tolist()) + "\n"


def test_the_servers_evaluation_sample_comes_from_a_factory_lm_too(byte_data):
    """The dashboard's text sample was {} for a model without a GPT-style generate method."""
    from lte.common.data.text import SAMPLE_NEW_TOKENS, evaluation_sample

    data = load_text(str(byte_data), eval_tokens=256)
    job = JobConfig(model="tests.test_lm:dict_lm", dataset="text", context=16).with_dataset(data)
    model = build_job_model(job)
    first = evaluation_sample(model, data, seed=4)
    assert first["sample"].startswith(first["sample_prompt"]) and model.training  # left as it was
    assert len(first["sample"].encode()) >= len(first["sample_prompt"].encode()) + SAMPLE_NEW_TOKENS // 4
    assert evaluation_sample(model, data, seed=4) == first  # seeded by the version
    assert evaluation_sample(model, data, seed=5) != first


def test_lte_generate_refuses_an_export_that_is_not_a_language_model_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file as save

    from lte.commands.generate import main as generate_main
    from lte.common.job.run_metadata import resolved_job

    job = JobConfig(model="mlp", dataset="fashion-mnist", num_classes=10, image_size=28, in_channels=1)
    path = tmp_path / "model.safetensors"
    save({"w": torch.zeros(1)}, str(path), metadata={"lte_job": json.dumps(resolved_job(job))})
    assert generate_main(["--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lte-generate needs a language model" in err, err
    assert err.startswith(f"lte-generate: error: {path}: a non-language model (mlp)"), err


@pytest.mark.slow
def test_lte_eval_finds_a_runs_relative_token_folder_from_anywhere_and_names_what_is_missing(
    byte_data, tmp_path, monkeypatch, capsys
):
    import shutil

    from lte.commands.eval import main as eval_main

    project = tmp_path / "project"  # where lte-server ran: data_dir and out are relative to it
    shutil.copytree(byte_data, project / "data" / "kjv")
    run_dir = project / "runs" / "r1"
    base = ["--model", "gpt-micro", "--dataset", "text", "--data-dir", str(byte_data), "--context", "16"]
    base += ["--heads", "2", "--rank", "4", "--steps", "2", "--merge-every", "2", "--batch-size", "2"]
    assert sim_main([*base, "--quiet", "--export", str(run_dir / "model.safetensors")]) == 0
    (run_dir / "config.toml").write_text('data_dir = "data/kjv"\nout = "runs/r1"\n')
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # not the project folder: data/kjv does not exist from here
    assert eval_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"validation windows\): val loss \d\.\d{4}, perplexity \d+\.\d\d, \d\.\d{3} bits/byte", out
    )
    # another dataset does not look in the run's token folder; a folder without token files is named
    assert eval_main([str(run_dir), "--dataset", "fashion-mnist"]) == 2
    assert eval_main([str(run_dir), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unexpected" not in err and f"--dataset text: {tmp_path}/meta.json: missing" in err


def test_token_data_of_another_tokenizer_is_refused(byte_data):
    from lte.common.job.trainer import LocalTrainer

    data = load_text(str(byte_data), eval_tokens=256)
    job = dataclasses.replace(tiny_job(byte_data), tokenizer="bpe:0123456789abcdef")
    with pytest.raises(ValueError, match="tokenizer bytes, but the job uses bpe:0123456789abcdef"):
        LocalTrainer(job, [0], data)
    small = dataclasses.replace(tiny_job(byte_data), num_classes=100)
    with pytest.raises(ValueError, match="vocabulary 256 is larger than the model's 100"):
        LocalTrainer(small, [0], data)


@pytest.mark.slow
def test_the_evaluation_sample_starts_at_a_line_of_val_bin_and_names_its_prompt(tmp_path):
    from lte.common.data.text import SAMPLE_PROMPT_TOKENS, evaluation_sample, sample_prompt_start

    lines = "".join(f"Ge1:{i} And God said, Let there be light number {i}.\n" for i in range(200))
    write_token_files(tmp_path, [lines], ByteTokenizer(), val_fraction=0.5)
    data = load_text(str(tmp_path), eval_tokens=256)
    val = ByteTokenizer().decode(np.asarray(data.val_tokens).tolist())
    start = sample_prompt_start(data.val_tokens, ByteTokenizer())
    assert start == val.index("\n") + 1 and val[start - 1] == "\n"  # the split fell mid-line
    record = evaluation_sample(tiny_gpt(vocab=256, context=48), data, seed=0)
    assert record["sample_prompt"] == val[start : start + SAMPLE_PROMPT_TOKENS]
    assert (
        record["sample"].startswith(record["sample_prompt"]) and len(record["sample"]) > SAMPLE_PROMPT_TOKENS
    )
    assert sample_prompt_start(np.frombuffer(b"no line ends here at all" * 4, np.uint8), ByteTokenizer()) == 0


# -- the dashboard ------------------------------------------------------------------------------------
def test_dashboard_status_and_metrics_carry_perplexity_and_the_text_sample():
    from prometheus_client.parser import text_string_to_metric_families

    from lte.server.dashboard import StatusCollector
    from lte.server.status import job_status

    evals = [
        {"version": 5, "samples": 80, "time": 1.0, "test_loss": 3.2, "perplexity": 24.5, "bits_per_byte": 4.6,
         "sample": "old"},
        {"version": 10, "samples": 160, "time": 2.0, "test_loss": 3.0, "perplexity": 20.1, "bits_per_byte": 4.3,
         "sample": "<script>alert(1)</script> & the word", "sample_prompt": "<script>"},
    ]  # fmt: skip
    st = {"job": {"task": "lm", "model": "gpt-micro"}, "version": 10, "done": False, "samples": 160,
          "bytes_up": 1, "bytes_down": 2, "workers": [], "history": [], "evals": evals}  # fmt: skip
    doc = job_status(st)
    assert doc.task == "lm" and doc.perplexity == 20.1 and doc.bits_per_byte == 4.3
    assert doc.text_sample == evals[-1]["sample"] and doc.text_sample_version == 10  # raw: the page escapes
    assert doc.text_sample_prompt == "<script>"
    assert [e.perplexity for e in doc.evals] == [24.5, 20.1]
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: st))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert families["lte_perplexity"].samples[0].value == pytest.approx(20.1)
    assert families["lte_bits_per_byte"].samples[0].value == pytest.approx(4.3)


def test_dashboard_leaves_every_image_option_out_of_a_language_models_job():
    from lte.server.dashboard import STATIC_DIR

    js = (STATIC_DIR / "dashboard.js").read_text()
    listed = js[js.index("const IMAGE_ONLY = new Set([") : js.index("]);", js.index("const IMAGE_ONLY"))]
    hidden = set(re.findall(r'"([a-z_]+)"', listed))
    job_fields = {f.name for f in dataclasses.fields(JobConfig)}
    assert hidden <= job_fields  # a renamed field would silently show again
    # the options of image data and of classification heads, RandAugment's two included
    image_options = {"image_size", "in_channels", "classes", "augment", "label_smoothing", "mixup", "cutmix"}
    image_options |= {name for name in job_fields if name.startswith("randaugment")}
    assert hidden == image_options


def test_dashboard_page_puts_the_sample_in_through_text_content_only():
    from lte.server.dashboard import STATIC_DIR

    js = (STATIC_DIR / "dashboard.js").read_text()
    body = js[js.index("function renderSample") : js.index("function render(st)")]
    assert 'setText("#text-sample-prompt", prompt)' in body and "innerHTML" not in body
    assert 'setText("#text-sample-rest", text.slice(prompt.length))' in body
    html = (STATIC_DIR / "index.html").read_text()
    assert (
        'id="text-sample"' in html and 'id="text-sample-prompt"' in html and 'id="text-sample-rest"' in html
    )


def test_lte_eval_of_an_lte_sim_export_asks_for_the_token_folder_in_one_line(byte_data, tmp_path, capsys):
    from lte.commands.eval import main as eval_main

    run = tmp_path / "run"  # lte-sim --export: no config.toml beside it naming the token folder
    base = ["--model", "gpt-micro", "--dataset", "text", "--data-dir", str(byte_data), "--context", "16"]
    base += ["--heads", "2", "--rank", "4", "--steps", "2", "--merge-every", "2", "--batch-size", "2"]
    assert sim_main([*base, "--quiet", "--export", str(run / "model.safetensors")]) == 0
    capsys.readouterr()
    assert eval_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lte-eval: error: --data-dir: text data needs its folder")
    assert "lte-prepare-text" in err and "--dataset text: --dataset text" not in err
    assert eval_main([str(run), "--data-dir", str(byte_data)]) == 0
    assert "validation windows" in capsys.readouterr().out
