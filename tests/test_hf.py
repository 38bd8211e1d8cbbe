"""Hugging Face models: outputs, Conv1D, tied embeddings of any model, hf:PATH, the HF export folder.

transformers is a test dependency (the ``dev`` extra includes ``hf``): under LTE_NO_SKIPS=1 a
missing transformers fails this module instead of skipping it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lte.commands.sim import main as sim_main  # noqa: E402
from lte.commands.sim import run_lte  # noqa: E402
from lte.common.core.layers import LTEConfig, LTEConv1D, LTEEmbedding, LTELinear, LTETiedLinear  # noqa: E402
from lte.common.core.merge import HeadUpdate, apply_updates  # noqa: E402
from lte.common.core.model_state import export_head_factors, load_head_factors, lte_layers, plain_state_dict  # noqa: E402
from lte.common.core.outputs import forward_logits, logits_of  # noqa: E402
from lte.common.core.policy import (  # noqa: E402
    HEADS,
    REPLICA,
    TIED,
    classify_model,
    expect_stacked_batch,
    prepare_model,  # noqa: E402
)
from lte.common.data.text import ByteTokenizer, load_text, write_token_files  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.model_check import explain_rows, explain_summary  # noqa: E402
from lte.common.job.trainer import build_job_model  # noqa: E402

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. Caf\u00e9 \u2014 \u00fcber.\n") * 60  # fmt: skip
TINY = dict(vocab_size=256, num_hidden_layers=2, num_attention_heads=4)


def save_configs(folder: Path) -> dict[str, Path]:
    """GPT-2 (Conv1D, tied, learned positions), Llama tied and untied: 2 layers, width 64, no dropout."""
    out = {}
    gpt2 = transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=None,
        eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    for name, config in (
        ("gpt2", gpt2),
        ("llama", transformers.LlamaConfig(**TINY, hidden_size=64, intermediate_size=128,
                                           max_position_embeddings=64, tie_word_embeddings=True)),
        ("llama-untied", transformers.LlamaConfig(**TINY, hidden_size=64, intermediate_size=128,
                                                  max_position_embeddings=64, tie_word_embeddings=False)),
    ):  # fmt: skip
        config.save_pretrained(folder / name)
        out[name] = folder / name
    return out


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return save_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes")
    write_token_files(folder, [TEXT], ByteTokenizer())
    return folder


def hf_job(configs, data, name, **kw) -> JobConfig:
    values = dict(
        model=f"hf:{configs[name]}", dataset="text", context=16, heads=4, rank=4, alpha=16.0,
        merge_every=2, steps=4, batch_size=2, lr=1e-2, seed=3, uplink="fp32",
    )  # fmt: skip
    values.update(kw)
    return JobConfig(**values).with_dataset(load_text(str(data), eval_tokens=256))


def build(configs, name) -> nn.Module:
    from lte.common.job.models import build_model

    torch.manual_seed(0)
    return build_model(f"hf:{configs[name]}", image_size=0, in_channels=0, num_classes=256, context=16)


# -- outputs -----------------------------------------------------------------------------------
def test_logits_are_found_in_a_tensor_model_output_dict_or_tuple():
    t = torch.randn(2, 3)
    output = transformers.modeling_outputs.CausalLMOutputWithPast(loss=None, logits=t)
    assert logits_of(t) is t and logits_of(output) is t and logits_of({"logits": t, "x": 1}) is t
    assert logits_of((t, None)) is t and logits_of({"scores": t}) is t
    with pytest.raises(TypeError, match="without logits"):
        logits_of(("not a tensor",))


def test_transformers_models_are_called_by_keyword_without_a_cache(configs):
    seen = {}
    model = build(configs, "llama")
    original = type(model).forward

    @functools.wraps(original)  # the same signature: forward_logits reads it
    def spy(self, *args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "forward", spy)
        logits = forward_logits(model, torch.randint(0, 256, (2, 8)))
    assert seen["args"] == () and seen["kwargs"]["use_cache"] is False and "input_ids" in seen["kwargs"]
    assert logits.shape == (2, 8, 256)


# -- Conv1D ------------------------------------------------------------------------------------
def test_conv1d_trains_as_the_linear_of_its_transposed_weight_and_merges_in_its_own_layout():
    torch.manual_seed(0)
    conv = Conv1D(6, 5).double()  # nf=6 out, nx=5 in: weight [5, 6]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(5, 6).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    cfg = LTEConfig(heads=2, total_heads=2, rank=3, alpha=6.0)
    a, b = LTEConv1D.from_module(conv, cfg, 0), LTELinear.from_linear(linear, cfg, 0)
    assert a.transposed and a.weight.shape == (5, 6) and a.master_shape == (5, 6)
    with torch.no_grad():  # trained-looking heads, and a previous merge to subtract
        for layer in (a, b):
            torch.manual_seed(1)
            layer.lora_B.normal_()
            layer.lora_B_prev.normal_()
            layer.lora_A_prev.normal_()
            layer.has_prev = True
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    assert torch.allclose(a(x), b(x)) and torch.allclose(a(x), a.reference_forward(x))
    # the wire carries (A^T, B^T): the master [in, out] merges them with no transposition
    master = {"w": conv.weight.detach().clone()}
    heads = [HeadUpdate(i, {"w": a.wire_factors(i)}) for i in range(2)]
    prev = {i: {"w": (a.lora_A_prev[i].mT, a.lora_B_prev[i].mT)} for i in range(2)}
    apply_updates(master, prev, heads, [0.5, 0.5], scale=a.scale)
    a.merge()
    b.merge()
    assert torch.allclose(master["w"], a.weight) and torch.allclose(a.weight, b.weight.T)
    assert torch.allclose(a.master_weight(), b.base_weight().T)


def test_conv1d_factors_round_trip_through_export_and_load(configs):
    model = prepare_model(build(configs, "gpt2"), LTEConfig(heads=2, rank=4, alpha=8.0))
    layers = lte_layers(model)
    layer = layers["transformer.h.0.attn.c_attn.weight"]
    assert isinstance(layer, LTEConv1D)
    with torch.no_grad():
        layer.lora_B.normal_()
    factors = export_head_factors(model, 1)
    b_wire, a_wire = factors["transformer.h.0.attn.c_attn.weight"]
    assert b_wire.shape == (64, 4) and a_wire.shape == (4, 192)  # [in, r], [r, out]: the master's layout
    before = layer.lora_B[1].clone()
    with torch.no_grad():
        layer.lora_B.zero_()
    load_head_factors(model, 1, factors)
    assert torch.equal(layer.lora_B[1], before)


def test_an_unconverted_linear_like_module_is_a_replica_named_with_the_reason():
    class Dense(nn.Module):  # a Linear of another library: lte does not know it
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.weight.T

    policy = classify_model(nn.Sequential(Dense(), nn.Linear(4, 2)))
    entry = policy.entries["0.weight"]
    assert entry.kind == REPLICA and "lte does not convert a Dense" in entry.note


# -- ties --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_tied_output_layer_gets_the_tables_heads_and_the_tie_holds(configs, name):
    plain = build(configs, name)
    table = "transformer.wte" if name == "gpt2" else "model.embed_tokens"
    policy = classify_model(plain, heads=2)
    assert policy.tied_outputs == {"lm_head": table}
    assert policy.entries[f"{table}.weight"].kind == HEADS
    assert (
        policy.entries["lm_head.weight"].kind == TIED
        and policy.entries["lm_head.weight"].owner == f"{table}.weight"
    )
    job = JobConfig(model="x", rank=16, uplink="fp32")
    share = explain_summary(explain_rows(policy, job, 2))["full_rank_up_share"]
    assert share < 0.10, share
    x = torch.randint(0, 256, (4, 16))
    plain.eval()
    reference = forward_logits(plain, x)
    model = prepare_model(plain, LTEConfig(heads=2, rank=4, alpha=8.0))
    assert isinstance(model.lm_head, LTETiedLinear) and model.lm_head.embedding is model.get_submodule(table)
    assert isinstance(model.get_submodule(table), LTEEmbedding) and "lm_head.weight" not in model.state_dict()
    expect_stacked_batch(model, 4)
    model.train()
    torch.testing.assert_close(forward_logits(model, x), reference)  # B = 0: every head computes W
    emb = model.get_submodule(table)
    with torch.no_grad():
        emb.lora_B.normal_()
    model.eval()
    emb.merge()
    state = plain_state_dict(model)
    assert torch.equal(state["lm_head.weight"], state[f"{table}.weight"])  # one table, both names
    assert not torch.equal(state[f"{table}.weight"], reference.new_zeros(1))


def test_an_untied_lm_head_is_an_lte_linear(configs):
    policy = classify_model(build(configs, "llama-untied"))
    assert policy.tied_outputs == {}
    assert (
        policy.entries["lm_head.weight"].kind == HEADS
        and policy.entries["model.embed_tokens.weight"].kind == HEADS
    )


# -- hf:PATH -----------------------------------------------------------------------------------
def sim(args, capsys) -> tuple[int, str]:
    code = sim_main(args)
    return code, capsys.readouterr().err


def test_bad_hf_models_are_refused_in_one_line(configs, byte_data, tmp_path, capsys, monkeypatch):
    base = ["--dataset", "text", "--data-dir", str(byte_data), "--context", "16", "--steps", "2", "--quiet"]
    for model, expected in bad_hf_models(configs, tmp_path):  # a hub name is never downloaded
        code, err = sim(["--model", model, *base], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    code, err = sim(["--model", f"hf:{configs['llama']}", *base[:-5], "--context", "65", *base[-3:]], capsys)
    assert code == 2 and "longer than the config's 64 positions" in err, err
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    code, err = sim(["--model", f"hf:{configs['llama']}", *base], capsys)
    assert code == 2 and "pip install 'lte[hf]'" in err and len(err.strip().splitlines()) == 1


def bad_hf_models(configs, folder: Path) -> list[tuple[str, str]]:
    """(``--model`` value, what its one-line refusal says): a hub name, a config without
    vocab_size, a vocabulary other than the byte token files' 256."""
    values = json.loads((configs["llama"] / "config.json").read_text())
    del values["vocab_size"]
    for name, config in (("novocab", values), ("v300", {**values, "vocab_size": 300})):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config))
    return [
        ("hf:gpt2", "lte never downloads"),
        (f"hf:{folder / 'novocab'}", "no vocab_size"),
        (f"hf:{folder / 'v300'}", "vocab_size 300 differs from the token files' vocabulary 256"),
    ]


def test_bad_hf_models_are_refused_by_lte_server_in_one_line_before_a_run_folder(
    configs, byte_data, tmp_path, capsys, monkeypatch
):
    """The same refusals as lte-sim's, through lte-server's command line: exit 2, one line, and no
    run folder left behind (checked before the server listens or writes anything)."""
    from lte.server.cli import main as server_main

    run = tmp_path / "run"
    base = ["--dataset", "text", "--data-dir", str(byte_data), "--context", "16", "--steps", "2", "--quiet"]
    base += ["--port", "0", "--dashboard-port", "-1", "--out", str(run)]
    cases = bad_hf_models(configs, tmp_path)
    for model, expected in [*cases, (f"hf:{configs['llama']}", "pip install 'lte[hf]'")]:
        if expected.startswith("pip"):
            monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
        code = server_main(["--model", model, *base])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("lte-server: error: ") and expected in err, err
        assert not run.exists(), model


def test_a_factory_is_told_the_context_and_the_vocabulary():
    from lte.common.job.models import build_model

    model = build_model("tests.test_hf:lm_factory", image_size=0, in_channels=0, num_classes=97, context=33)
    assert model.seen == {"context": 33, "vocab_size": 97}


class _Seen(nn.Module):
    def __init__(self, **seen):
        super().__init__()
        self.seen = seen
        self.linear = nn.Linear(2, 2)


def lm_factory(context: int, vocab_size: int) -> nn.Module:
    return _Seen(context=context, vocab_size=vocab_size)


# -- training: lte-sim equals the network bit for bit; the HF export folder --------------------
@pytest.mark.server
@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-untied"])
def test_sync_over_the_network_reproduces_the_emulator(configs, byte_data, tmp_path, name):
    from lte.server.coordinator import Coordinator
    from lte.server.grpc_server import ParameterServer
    from tests.cluster import worker_processes

    job = hf_job(configs, byte_data, name)
    data = load_text(str(byte_data), eval_tokens=256)
    expected = run_lte(job, data, workers=2).master
    coordinator = Coordinator(job, data, heads_per_worker=2, turn_grace_s=600, straggler_factor=0)
    server = ParameterServer(coordinator, host="127.0.0.1", port=0).start()
    try:
        threads = ["--threads", str(torch.get_num_threads())]
        extra = ["--quiet", "--max-heads", "2", "--data-dir", str(byte_data), *threads]
        with worker_processes(server.address, [extra] * 2, log_dir=tmp_path):
            assert server.wait_done(timeout=300), "job did not finish in time; see worker logs"
        got = coordinator.plain_state()
    finally:
        server.stop(grace=0.5)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # bit for bit: Conv1D, the tied table, everything
    assert not torch.equal(expected["model.norm.weight" if "llama" in name else "transformer.ln_f.weight"],
                           torch.ones(64))  # fmt: skip  # it trained


TWO_WINDOWS = torch.tensor([ByteTokenizer().encode(TEXT[:16]), ByteTokenizer().encode(TEXT[16:32])])


def export_model_of(job: JobConfig, export: Path) -> nn.Module:
    """The job's model (lte's own build, another seed's init) holding the weights of an lte export, in eval mode."""
    model = build_job_model(job, seed=99)
    model.load_state_dict(load_file(str(export)), strict=True)
    return model.eval()


def test_the_hf_export_folder_loads_with_transformers_and_lte(configs, byte_data, tmp_path, capsys):

    from lte.commands.eval import main as eval_main
    from lte.commands.generate import main as generate_main

    out = tmp_path / "run" / "model.safetensors"
    args = ["--model", f"hf:{configs['gpt2']}", "--dataset", "text", "--data-dir", str(byte_data)]
    args += ["--context", "16", "--heads", "2", "--rank", "4", "--steps", "4", "--merge-every", "2"]
    args += ["--batch-size", "2", "--quiet", "--json", "--export", str(out)]
    assert sim_main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = out.parent / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= {
        p.name for p in folder.iterdir()
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = "And God said, Caf\u00e9 \u2014 \U0001f600\n"
    assert (
        tok(text)["input_ids"] == ByteTokenizer().encode(text) and tok.decode(tok(text)["input_ids"]) == text
    )
    job = hf_job(configs, byte_data, "gpt2")
    ref = export_model_of(job, out)
    with torch.no_grad():
        assert torch.equal(hf(TWO_WINDOWS).logits, forward_logits(ref, TWO_WINDOWS))
    assert hf.lm_head.weight is hf.transformer.wte.weight  # transformers tied them again
    generated = hf.generate(TWO_WINDOWS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 21)
    assert generate_main(["--model", str(folder), "--prompt", "And God", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("And God")
    assert eval_main([str(folder), "--data-dir", str(byte_data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_loss"] == pytest.approx(result["test_loss"], rel=1e-6)


def test_lte_generate_samples_from_a_hf_jobs_model_safetensors(configs, byte_data, tmp_path, capsys):
    """lte-generate read only the hf/ folder: the lte export beside it was refused ("a hf:... model
    cannot generate text; lte-generate needs a GPT")."""
    from safetensors.torch import load_file

    from lte.commands.generate import main as generate_main
    from lte.common.core.outputs import generate_tokens
    from lte.common.job.trainer import build_job_model

    out = tmp_path / "run" / "model.safetensors"
    args = ["--model", f"hf:{configs['llama']}", "--dataset", "text", "--data-dir", str(byte_data)]
    args += ["--context", "16", "--heads", "2", "--rank", "4", "--steps", "2", "--merge-every", "2"]
    assert sim_main([*args, "--batch-size", "2", "--quiet", "--export", str(out)]) == 0
    capsys.readouterr()
    job = hf_job(configs, byte_data, "llama")
    ref = build_job_model(job, seed=99)
    ref.load_state_dict(load_file(str(out)), strict=True)
    ref.eval()
    prompt = torch.tensor([ByteTokenizer().encode("And God")])
    # 20 new tokens past the job's 16-token windows (the config allows 64 positions)
    expected = generate_tokens(ref, prompt, 20, context=16, temperature=0.8, top_k=40,
                               generator=torch.Generator().manual_seed(5))  # fmt: skip
    gen = ["--model", str(out), "--prompt", "And God", "--max-new-tokens", "20", "--seed", "5"]
    assert generate_main(gen) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == ByteTokenizer().decode(expected[0].tolist()) + "\n"
    greedy = generate_tokens(ref, prompt, 1, context=16, temperature=0)
    assert int(greedy[0, -1]) == int(ref(prompt).logits[0, -1].argmax())


def test_lte_generate_samples_an_hf_folder_as_its_lte_export_and_refuses_other_files_in_one_line(
    configs, byte_data, tmp_path, capsys
):
    """A review found the hf/ folder cut short at its positions (71 characters where the lte export
    gave 135), a traceback for a prompt that fills the positions or --max-new-tokens 0, and one for
    a file that is not safetensors; a run folder was "no such model file" though lte-eval takes it."""
    from lte.commands.generate import main as generate_main

    out = tmp_path / "run" / "model.safetensors"
    args = ["--model", f"hf:{configs['gpt2']}", "--dataset", "text", "--data-dir", str(byte_data)]
    args += ["--context", "16", "--heads", "2", "--rank", "4", "--steps", "2", "--merge-every", "2"]
    assert sim_main([*args, "--batch-size", "2", "--quiet", "--export", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out.parent / "hf" / "config.json").read_text())["n_positions"] == 64
    texts = {}
    for model in (out.parent / "hf", out, out.parent):  # the folder, the export, the run folder
        gen = ["--model", str(model), "--prompt", "And God", "--max-new-tokens", "80", "--temperature", "0"]
        assert generate_main(gen) == 0, capsys.readouterr().err
        texts[model.name] = capsys.readouterr().out
    # the same length from every form (the export slides the job's 16-token window, the folder its
    # config's 64 positions, so the greedy texts differ past 16 tokens); the run folder is its export
    assert {len(t) for t in texts.values()} == {len("And God") + 80 + 1}, texts
    assert texts["run"] == texts["model.safetensors"]
    full = "In the beginning " * 4  # 68 tokens: past the 64 positions
    for extra in (["--max-new-tokens", "5"], ["--max-new-tokens", "0"]):
        assert generate_main(["--model", str(out.parent / "hf"), "--prompt", full, *extra]) == 0
        assert capsys.readouterr().out.startswith(full)
    (tmp_path / "notes.toml").write_text("steps = 4\n")
    assert generate_main(["--model", str(tmp_path / "notes.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a safetensors file" in err[0], err


def llama_factory(vocab_size: int, context: int) -> nn.Module:
    """A user's factory returning a transformers model (not ``hf:PATH``): tied Llama, 2 layers."""
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**TINY, "vocab_size": vocab_size}, hidden_size=64, intermediate_size=128,
                                 max_position_embeddings=max(64, context), tie_word_embeddings=True)
    )  # fmt: skip


def test_a_factory_returning_a_transformers_model_gets_the_hf_folder(byte_data, tmp_path, capsys):
    """The hf/ folder was written for hf:PATH jobs only."""

    from lte.commands.generate import main as generate_main

    out = tmp_path / "run" / "model.safetensors"
    args = ["--model", "tests.test_hf:llama_factory", "--dataset", "text", "--data-dir", str(byte_data)]
    args += ["--context", "16", "--heads", "2", "--rank", "4", "--steps", "4", "--merge-every", "2"]
    assert sim_main([*args, "--batch-size", "2", "--quiet", "--export", str(out)]) == 0
    capsys.readouterr()
    folder = out.parent / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= {
        p.name for p in folder.iterdir()
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == 256
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # the tie, as transformers expects it
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok("And God")["input_ids"] == ByteTokenizer().encode("And God")
    job = JobConfig(model="tests.test_hf:llama_factory", dataset="text", context=16).with_dataset(
        load_text(str(byte_data), eval_tokens=256)
    )
    ref = export_model_of(job, out)
    with torch.no_grad():
        assert torch.equal(hf(TWO_WINDOWS).logits, forward_logits(ref, TWO_WINDOWS))
        assert not torch.equal(ref.model.norm.weight, torch.ones(64))  # it trained
    # both exports generate: the lte one through the job's factory, the folder through transformers
    assert generate_main(["--model", str(out), "--prompt", "And", "--max-new-tokens", "4"]) == 0
    assert generate_main(["--model", str(folder), "--prompt", "And", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("And") >= 2


@pytest.mark.process
def test_lte_sim_cli_without_transformers_installed_says_how_to_install_it(configs, byte_data, tmp_path):
    # a child Python where importing transformers fails, as on a machine without the extra
    (tmp_path / "transformers.py").write_text("raise ImportError('No module named transformers')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    args = ["--model", f"hf:{configs['llama']}", "--dataset", "text", "--data-dir", str(byte_data)]
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lte-sim"), *args, "--context", "16"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "lte-sim: error: Hugging Face models need the transformers package, which is not installed: "
        "pip install 'lte[hf]' (or: pip install transformers)"
    ], run.stderr


# -- lte-prepare-text: records from jsonl, parquet and datasets folders ------------------------
def test_prepare_text_streams_jsonl_parquet_and_datasets_folders_to_the_same_tokens(tmp_path, capsys):
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lte.commands.prepare_text import main as prepare_main
    from lte.common.data.text import BATCH_ROWS

    records = [f"verse {i}: and it was so \u00e9" + ("\n" if i % 3 else "") for i in range(BATCH_ROWS + 300)]
    rows = [{"body": r, "id": i} for i, r in enumerate(records)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=500)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    expected = [ByteTokenizer().encode(r if r.endswith("\n") else r + "\n") for r in records]
    cut = int(len(records) * 0.9)
    for source in ("a.jsonl", "a.parquet", "ds"):
        out = tmp_path / f"out-{source}"
        assert prepare_main([str(tmp_path / source), "--out", str(out), "--text-column", "body"]) == 0
        train = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
        val = np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
        assert train == sum(expected[:cut], []) and val == sum(expected[cut:], []), source
        meta = json.loads((out / "meta.json").read_text())
        assert meta["val_tokens"] == len(val) and meta["train_bytes"] == len(train)
    capsys.readouterr()
    assert (
        prepare_main([str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o"), "--text-column", "nope"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'nope'" in err[0] and "--text-column" in err[0]
    (tmp_path / "bad.parquet").write_text("not parquet")  # named in the one line, not pyarrow's bare text
    assert prepare_main([str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.parquet: not a readable parquet file" in err[0], err
    assert prepare_main([str(tmp_path / "ds"), "--out", str(tmp_path / "o"), "--tokenizer", "bpe",
                         "--vocab-size", "300", "--text-column", "body"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["vocab_size"] == 300


def test_the_servers_evaluation_sample_of_a_transformers_model_is_seeded_and_fits_its_positions(
    configs, byte_data
):
    from lte.common.data.text import SAMPLE_PROMPT_TOKENS, evaluation_sample

    data = load_text(str(byte_data), eval_tokens=256)
    model = build(configs, "gpt2")  # 64 positions: the 32-token prompt leaves room for 32 more
    state = torch.get_rng_state()
    first, again = evaluation_sample(model, data, seed=5), evaluation_sample(model, data, seed=5)
    assert first == again and torch.equal(torch.get_rng_state(), state)  # the global generator untouched
    tokens = ByteTokenizer().encode(first["sample"])
    assert first["sample"].startswith(first["sample_prompt"]) and len(tokens) > SAMPLE_PROMPT_TOKENS
    assert evaluation_sample(model, data, seed=6) != first


def test_dropout_is_named_at_start_up_as_what_breaks_bit_identity(configs, tmp_path):
    plain = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = transformers.AutoModelForCausalLM.from_config(plain)  # GPT-2's default dropout 0.1
    assert any("dropout module(s) (p up to 0.1)" in w for w in classify_model(model).warnings)
    assert not [w for w in classify_model(build(configs, "gpt2")).warnings if "dropout" in w]


def test_a_workers_conv1d_factors_round_to_exactly_what_the_wire_carries(configs):
    # int8-block rounds in blocks of the sent tensor: a Conv1D head sends (A^T, B^T), so the
    # worker must round in that layout for both sides to hold the same B', A'
    from types import SimpleNamespace

    from lte.common.wire.codec import get_codec
    from lte.common.wire.protocol import Role, codec_for
    from lte.worker.pushes import round_factors_to_wire

    job = JobConfig(model="x", uplink="int8-block")
    model = prepare_model(build(configs, "gpt2"), LTEConfig(heads=2, rank=4, alpha=8.0))
    with torch.no_grad():
        for layer in lte_layers(model).values():
            layer.lora_B.normal_()
    round_factors_to_wire(SimpleNamespace(model=model), job)  # type: ignore[arg-type]
    codec = get_codec(codec_for(Role.HEAD_FACTOR, job))
    for head in range(2):
        for name, factors in export_head_factors(model, head).items():
            for t in factors:
                sent = codec.decode(codec.encode(t.float().contiguous()), tuple(t.shape))
                assert torch.equal(sent, t.float()), name  # nothing left to round: both sides agree


def test_the_update_guard_bounds_a_conv1d_heads_b_not_its_a_in_the_first_round(configs, byte_data):
    """Conv1D factors travel as (A^T, B^T): the guard bounded the first factor from 0 in a head's
    first round, which is A^T (entries of the init's size), and refused every honest GPT-2 push at
    lr 1e-3, quarantining every worker (the job stopped at version 2 of 4)."""
    from tests.server_path import run_through_server

    job = hf_job(
        configs, byte_data, "gpt2", heads=2, rank=16, merge_every=5, steps=20, lr=1e-3, uplink="fp16"
    )
    c = run_through_server(job, load_text(str(byte_data), eval_tokens=256), workers=2)
    assert c.guard.outliers == c.guard.rollbacks == 0, c.guard.status()
    assert c.version == job.rounds
