import hashlib
import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.models import convert_weights
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.training import FullModelHFCheckpointer
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from packrl.checkpointing import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from packrl.checkpointing import save as checkpoint_writer
from packrl.models.convert import tune_to_hf
from packrl.training.distributed import gather_to_rank0

DIMS = dict(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=64,
    max_seq_len=64,
    rope_base=100_000,
    scale_factor=1,
)
LORA = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj"], apply_lora_to_mlp=True)
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "head_dim": 8,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "vocab_size": 64,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
}


def tiny(seed=0, lora=False):
    torch.manual_seed(seed)
    if lora:
        return lora_llama3_2(**LORA, lora_rank=4, lora_alpha=8.0, **DIMS)
    return llama3_2(**DIMS)


@pytest.fixture()
def source_dir(tmp_path):
    return make_source(tmp_path / "source")


def make_source(src: Path) -> Path:
    """An HF model dir for the tiny model: weights, config, a tokenizer file, a GGUF marker."""
    src.mkdir()
    sd = tiny(seed=123).state_dict()
    hf = convert_weights.tune_to_hf(sd, num_heads=4, num_kv_heads=2, dim=32, head_dim=8)
    save_file({k: v.contiguous() for k, v in hf.items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (src / "packrl_source.json").write_text("{}")
    return src


def load_source(model, src):
    """What the recipe does at startup: source weights into a (LoRA) model."""
    hf = load_file(src / "model.safetensors")
    sd = convert_weights.hf_to_tune(hf, num_heads=4, num_kv_heads=2, dim=32, head_dim=8)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    return model


def setup_training(model, lr=1e-2):
    """AdamW and torchtune's warmup + cosine schedule, as the recipe configs use."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=20)
    return opt, sched


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


def train_step(model, opt, sched) -> float:
    logits = model(TOKENS[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def freeze_base(model):
    for n, p in model.named_parameters():
        p.requires_grad_("lora" in n)


def rng_draws(gen):
    return (
        torch.rand(3).tolist(),
        random.random(),
        np.random.rand(2).tolist(),
        torch.rand(3, generator=gen).tolist(),
    )


def test_full_save_load_is_exact(source_dir, tmp_path):
    out = tmp_path / "out"
    model = load_source(tiny(), source_dir)
    opt, sched = setup_training(model)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        train_step(model, opt, sched)
    torch.rand(1, generator=gen)
    step_dir = save_checkpoint(
        out,
        3,
        model=model,
        source_checkpoint_dir=source_dir,
        optimizer=opt,
        lr_scheduler=sched,
        data_state={"epoch": 1, "index": 7},
        generators={"sampler": gen},
    )
    assert step_dir == out / "step_3" and latest_checkpoint(out) == step_dir
    assert (out / "latest").read_text().strip() == "step_3"
    # source files copied (config, tokenizer), other runs' markers not
    assert (step_dir / "tokenizer_config.json").is_file()
    assert not (step_dir / "packrl_source.json").exists()
    expected_draws = rng_draws(gen)
    saved_lr = sched.get_last_lr()
    expected_next_loss = train_step(model, opt, sched)

    fresh = tiny(seed=99)
    fresh_opt, fresh_sched = setup_training(fresh)
    fresh_gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1234), random.seed(1), np.random.seed(1)
    info = load_checkpoint(
        out,
        model=fresh,
        optimizer=fresh_opt,
        lr_scheduler=fresh_sched,
        generators={"sampler": fresh_gen},
    )
    assert info["step"] == 3 and info["data_state"] == {"epoch": 1, "index": 7}
    assert info["path"] == step_dir
    assert fresh_sched.get_last_lr() == saved_lr != setup_training(tiny())[1].get_last_lr()
    assert rng_draws(fresh_gen) == expected_draws
    saved_state = torch.load(step_dir / "training_state.pt", weights_only=True)
    assert saved_state["lr_scheduler"]["last_epoch"] == fresh_sched.last_epoch == 3
    # optimizer state is bitwise the saved one
    for k, v in saved_state["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(fresh_opt.state_dict()["state"][k][name], t), (k, name)
    # the next step is identical (params, optimizer and schedule all restored exactly)
    assert train_step(fresh, fresh_opt, fresh_sched) == expected_next_loss
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_full_checkpoint_reloads_in_torchtune_with_shards(source_dir, tmp_path):
    model = load_source(tiny(), source_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    step_dir = save_checkpoint(
        tmp_path / "out", 1, model=model, source_checkpoint_dir=source_dir, max_shard_bytes=20_000
    )
    index = json.loads((step_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((step_dir / s).is_file() for s in shards)
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(step_dir),
        checkpoint_files=shards,
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "tt_out"),
    )
    loaded = ckpt.load_checkpoint()["model"]
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.slow
def test_full_checkpoint_loads_in_transformers(source_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = load_source(tiny(), source_dir).eval()
    step_dir = save_checkpoint(tmp_path / "out", 1, model=model, source_checkpoint_dir=source_dir)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(step_dir).eval()
    with torch.no_grad():
        expected = model(TOKENS)
        got = hf_model(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


QWEN2_DIMS = dict(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=64,
    max_seq_len=64,
    tie_word_embeddings=True,
)
QWEN2_CONFIG = {
    **{k: v for k, v in HF_CONFIG.items() if k != "head_dim"},
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "rope_theta": 1_000_000.0,
    "use_sliding_window": False,
}


def tiny_adapted(model_type: str, use_dora: bool, seed: int = 0):
    """A tiny LoRA/DoRA model on q/k/v and the MLP, and its base weights' HF config."""
    from torchtune.models.qwen2._component_builders import lora_qwen2

    torch.manual_seed(seed)
    if model_type == "QWEN2":
        model = lora_qwen2(
            LORA["lora_attn_modules"],
            apply_lora_to_mlp=True,
            lora_rank=4,
            lora_alpha=8.0,
            use_dora=use_dora,
            **QWEN2_DIMS,
        )
        return model, QWEN2_CONFIG
    return lora_llama3_2(**LORA, lora_rank=4, lora_alpha=8.0, use_dora=use_dora, **DIMS), HF_CONFIG


# Not QWEN2 + DoRA: torchtune's DoRALinear scales the bias (Qwen2 has q/k/v biases) by the
# magnitude ratio, PEFT and torchtune's own merge do not, so no PEFT adapter can match it.
@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type, use_dora",
    [("LLAMA3_2", False), ("LLAMA3_2", True), ("QWEN2", False)],
    ids=["llama-lora", "llama-dora", "qwen2-lora"],
)
def test_adapter_loads_in_peft(model_type, use_dora, tmp_path, monkeypatch):
    """transformers + peft, given the base dir and the saved adapter, reproduce the torchtune
    model's logits: the PEFT keys and the row layout of q/k lora_B (and DoRA magnitudes) fit
    the HF base weights of each model type (Llama: RoPE rows permuted; Qwen2: not)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # torchtune pins torchao 0.13; peft's optional torchao layers want >= 0.16 and raise on
    # import checks. They play no part in plain LoRA, so report torchao as absent.
    monkeypatch.setattr("peft.tuners.lora.torchao.is_torchao_available", lambda: False)
    model, config = tiny_adapted(model_type, use_dora)
    base_sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    base_sd = {k: v for k, v in base_sd.items() if not k.endswith("magnitude")}
    src = tmp_path / "source"
    src.mkdir()
    hf = tune_to_hf(base_sd, model_type, config)
    save_file({k: v.contiguous() for k, v in hf.items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "initialize_dora_magnitude"):
                module.initialize_dora_magnitude()
        for n, p in model.named_parameters():
            if "lora_b" in n:  # zero at init: nonzero so a wrong layout changes the logits
                p.normal_(std=0.1)
            if n.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.randn_like(p))
    step_dir = save_checkpoint(
        tmp_path / "out", 1, model=model, source_checkpoint_dir=src, adapter_only=True
    )
    arch = transformers.Qwen2ForCausalLM if model_type == "QWEN2" else transformers.LlamaForCausalLM
    base = arch.from_pretrained(src, dtype=torch.float32)
    hf_model = peft.PeftModel.from_pretrained(base, step_dir).eval()
    with torch.no_grad():
        expected = model(TOKENS)
        got = hf_model(input_ids=TOKENS).logits
    # fp32: measured max |diff| <= 8e-6 here; a wrong q/k layout was off by 0.46-1.1.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), hf_model.disable_adapter():
        assert (hf_model(input_ids=TOKENS).logits - expected).abs().max() > 1e-2


def test_lora_peft_files_and_exact_resume(source_dir, tmp_path):
    out = tmp_path / "out"
    model = load_source(tiny(lora=True), source_dir)
    freeze_base(model)
    opt, sched = setup_training(model)
    for _ in range(2):
        train_step(model, opt, sched)
    step_dir = save_checkpoint(
        out, 2, model=model, source_checkpoint_dir=source_dir, optimizer=opt, lr_scheduler=sched
    )

    cfg = json.loads((step_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["use_dora"] is False
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]
    )
    assert cfg["base_model_name_or_path"] == str(source_dir.resolve())

    # PEFT math on HF weights: base + alpha/r * B @ A must equal the merged full checkpoint.
    peft = load_file(step_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft
    base = load_file(source_dir / "model.safetensors")
    merged = load_file(step_dir / "model.safetensors")
    assert merged.keys() == base.keys()
    targets = 0
    for key, w in base.items():
        a_key = "base_model.model." + key.replace(".weight", ".lora_A.weight")
        if a_key in peft:
            b = peft[a_key.replace("lora_A", "lora_B")]
            w = w + (8.0 / 4) * b @ peft[a_key]
            targets += 1
        torch.testing.assert_close(merged[key], w, rtol=1e-5, atol=1e-6)
    assert targets == 2 * 6

    # resume: source weights + saved adapters -> identical next step
    expected_next = train_step(model, opt, sched)
    fresh = load_source(tiny(seed=5, lora=True), source_dir)
    freeze_base(fresh)
    fresh_opt, fresh_sched = setup_training(fresh)
    assert (
        load_checkpoint(step_dir, model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched)[
            "step"
        ]
        == 2
    )
    assert train_step(fresh, fresh_opt, fresh_sched) == expected_next
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_lora_adapter_only(source_dir, tmp_path):
    model = load_source(tiny(lora=True), source_dir)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_()
    step_dir = save_checkpoint(
        tmp_path / "out", 4, model=model, source_checkpoint_dir=source_dir, adapter_only=True
    )
    names = {p.name for p in step_dir.iterdir()}
    assert names == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_state.pt",
        "packrl_checkpoint.json",
    }
    fresh = load_source(tiny(seed=3, lora=True), source_dir)
    load_checkpoint(tmp_path / "out", model=fresh)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_checkpoint(
            tmp_path / "x", 1, model=tiny(), source_checkpoint_dir=source_dir, adapter_only=True
        )


def test_exception_mid_save_keeps_previous_checkpoint(source_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    model = load_source(tiny(), source_dir)
    save_checkpoint(out, 1, model=model, source_checkpoint_dir=source_dir)
    good = model.state_dict()["norm.scale"].clone()
    with torch.no_grad():
        model.norm.scale.add_(1.0)

    def boom(path, state):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint_writer, "_save_training_state", boom)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(out, 2, model=model, source_checkpoint_dir=source_dir)
    assert latest_checkpoint(out) == out / "step_1"
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_1"]
    fresh = tiny(seed=4)
    assert load_checkpoint(out, model=fresh)["step"] == 1
    assert torch.equal(fresh.norm.scale, good)


def test_killed_mid_save_keeps_previous_checkpoint(source_dir, tmp_path):
    """A real crash: the saving process is SIGKILLed after writing the weights of step 2."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpointing import tiny, load_source
        from pathlib import Path
        from packrl.checkpointing import save as checkpoint_writer
        src, out = Path({str(source_dir)!r}), Path({str(out)!r})
        model = load_source(tiny(), src)
        checkpoint_writer.save_checkpoint(out, 1, model=model, source_checkpoint_dir=src)
        checkpoint_writer._save_training_state = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint_writer.save_checkpoint(out, 2, model=model, source_checkpoint_dir=src)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-step_2")]
    assert leftovers and (out / leftovers[0] / "model.safetensors").is_file()  # it was mid-save
    assert latest_checkpoint(out) == out / "step_1"
    assert load_checkpoint(out, model=tiny(seed=4))["step"] == 1
    # the next save cleans up the debris (also a half-written pointer file)
    (out / ".tmp-step_latest").write_text("step_")
    save_checkpoint(out, 3, model=tiny(), source_checkpoint_dir=source_dir, keep_last=1)
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_3"]


def test_bad_checkpoints_name_the_problem(source_dir, tmp_path):
    out = tmp_path / "out"
    model = load_source(tiny(), source_dir)
    opt, _ = setup_training(model)
    gen = torch.Generator()
    step_dir = save_checkpoint(
        out, 1, model=model, source_checkpoint_dir=source_dir, generators={"g": gen}
    )

    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere", model=tiny())
    with pytest.raises(CheckpointError, match="generators"):
        load_checkpoint(out, model=tiny(), generators={})
    with pytest.raises(CheckpointError, match="without optimizer state"):
        load_checkpoint(out, model=tiny(), optimizer=opt, generators={"g": gen})
    with pytest.raises(CheckpointError, match="different model"):
        load_checkpoint(out, model=tiny(lora=True), generators={"g": gen})
    other = llama3_2(**{**DIMS, "embed_dim": 64})
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(out, model=other, generators={"g": gen})
    with pytest.raises(CheckpointError, match="does not fit the model.*bfloat16"):
        load_checkpoint(out, model=tiny().to(torch.bfloat16), generators={"g": gen})

    (step_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(out, model=tiny(), generators={"g": gen})
    (step_dir / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="training_state.pt is corrupt"):
        load_checkpoint(step_dir, model=tiny(), generators={"g": gen})
    (step_dir / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match="training_state.pt is missing"):
        load_checkpoint(step_dir, model=tiny(), generators={"g": gen})
    (out / "latest").write_text("step_9\n")
    with pytest.raises(CheckpointError, match="step_9"):
        load_checkpoint(out, model=tiny())

    with pytest.raises(ValueError, match="model_type='GEMMA'"):
        save_checkpoint(out, 2, model=model, source_checkpoint_dir=source_dir, model_type="gemma")
    with pytest.raises(TypeError, match="data_state must hold only plain"):
        save_checkpoint(
            out, 2, model=model, source_checkpoint_dir=source_dir, data_state={"x": np.int64(3)}
        )
    with pytest.raises(TypeError, match=r"generators\['g'\] must be a torch.Generator"):
        save_checkpoint(out, 2, model=model, source_checkpoint_dir=source_dir, generators={"g": 3})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        save_checkpoint(out, 2, model=model, source_checkpoint_dir=tmp_path)


def test_keep_last(source_dir, tmp_path):
    out = tmp_path / "out"
    model = load_source(tiny(), source_dir)
    for step in (1, 2, 3):
        save_checkpoint(out, step, model=model, source_checkpoint_dir=source_dir, keep_last=2)
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_2", "step_3"]
    # saving a step again replaces it atomically
    save_checkpoint(out, 3, model=model, source_checkpoint_dir=source_dir, keep_last=2)
    assert latest_checkpoint(out) == out / "step_3"
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_2", "step_3"]


def test_smollm2_checkpoint_round_trips_through_torchtune(smollm2_dir, smollm2_model, tmp_path):
    step_dir = save_checkpoint(
        tmp_path / "out", 0, model=smollm2_model, source_checkpoint_dir=smollm2_dir
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (step_dir / name).read_bytes() == (Path(smollm2_dir) / name).read_bytes()
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(step_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "tt_out"),
    )
    loaded = ckpt.load_checkpoint()["model"]
    expected = smollm2_model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # The fault of issue 15: 1 MiB of zeros inside model.safetensors, same size. Resume used to
    # accept it; now it is refused, before anything is loaded into the (shared) model.
    weights = step_dir / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(100 * 2**20)
        f.write(bytes(2**20))
    assert weights.stat().st_size == size
    with pytest.raises(CheckpointError, match=f"{weights} is corrupt: its sha256 differs"):
        load_checkpoint(step_dir, model=smollm2_model)


def test_qwen2_uses_its_own_conversion(tmp_path):
    """QWEN2 (biases on q/k/v, tied embeddings) goes through torchtune's qwen2 converters:
    the saved dir reloads bitwise through FullModelHFCheckpointer(model_type="QWEN2"), and a
    LoRA run resumes its adapters exactly."""
    from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    dims, config = QWEN2_DIMS, QWEN2_CONFIG
    src = tmp_path / "qwen_src"
    src.mkdir()
    torch.manual_seed(0)
    model = qwen2(**dims)
    assert any(k.endswith("q_proj.bias") for k in model.state_dict())
    heads = dict(num_heads=4, num_kv_heads=2, dim=32, tie_word_embeddings=True)
    hf = qwen2_tune_to_hf(model.state_dict(), **heads)
    save_file({k: v.contiguous() for k, v in hf.items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    step_dir = save_checkpoint(tmp_path / "out", 1, model=model, source_checkpoint_dir=src)
    meta = json.loads((step_dir / "packrl_checkpoint.json").read_text())
    assert meta["model_type"] == "QWEN2"  # inferred from config.json
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(step_dir),
        checkpoint_files=["model.safetensors"],
        model_type="QWEN2",
        output_dir=str(tmp_path / "tt_out"),
    )
    loaded = ckpt.load_checkpoint()["model"]
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    fresh = qwen2(**dims)
    load_checkpoint(step_dir, model=fresh)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )

    lora = lora_qwen2(["q_proj", "v_proj"], lora_rank=2, lora_alpha=4.0, **dims)
    lora.load_state_dict(fresh.state_dict(), strict=False)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_b" in n:
                p.normal_()
    step_dir = save_checkpoint(tmp_path / "out", 2, model=lora, source_checkpoint_dir=src)
    peft_cfg = json.loads((step_dir / "adapter_config.json").read_text())
    assert sorted(peft_cfg["target_modules"]) == ["q_proj", "v_proj"] and peft_cfg["r"] == 2
    again = lora_qwen2(["q_proj", "v_proj"], lora_rank=2, lora_alpha=4.0, **dims)
    again.load_state_dict(fresh.state_dict(), strict=False)
    load_checkpoint(tmp_path / "out", model=again)
    for (n, a), b in zip(lora.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------- verified checkpoints


def test_manifest_checksums_every_file(source_dir, tmp_path):
    model = load_source(tiny(lora=True), source_dir)
    step_dir = save_checkpoint(tmp_path / "out", 1, model=model, source_checkpoint_dir=source_dir)
    meta = json.loads((step_dir / "packrl_checkpoint.json").read_text())
    on_disk = {p.name for p in step_dir.iterdir()} - {"packrl_checkpoint.json"}
    assert set(meta["checksums"]) == on_disk and "training_state.pt" in on_disk
    for name, want in meta["checksums"].items():
        data = (step_dir / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_corrupt_or_truncated_file_names_it_and_the_previous_checkpoint(source_dir, tmp_path):
    """Zeros written inside model.safetensors (same size) and a truncated training state are
    errors naming the file and how to fall back to the previous complete checkpoint."""
    out = tmp_path / "out"
    model = load_source(tiny(), source_dir)
    opt, sched = setup_training(model)
    save_checkpoint(out, 1, model=model, source_checkpoint_dir=source_dir, optimizer=opt)
    train_step(model, opt, sched)
    step_2 = save_checkpoint(out, 2, model=model, source_checkpoint_dir=source_dir, optimizer=opt)

    weights = step_2 / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # zeros over the second half of the tensor data
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    assert weights.stat().st_size == size
    fresh = tiny(seed=9)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out, model=fresh, optimizer=setup_training(fresh)[0])
    msg = str(e.value)
    assert f"{weights} is corrupt" in msg and "sha256 differs" in msg
    assert f"previous complete checkpoint is {out / 'step_1'}" in msg
    assert f"write 'step_1' into {out / 'latest'}" in msg
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # untouched

    state = step_2 / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=r"training_state.pt is corrupt: 1000 bytes, \d+ when"
    ):
        load_checkpoint(out, model=tiny())
    # the hint works: point latest at step_1 and resume from it
    (out / "latest").write_text("step_1\n")
    assert load_checkpoint(out, model=fresh, optimizer=setup_training(fresh)[0])["step"] == 1
    # the first checkpoint has no earlier one to point at
    (out / "step_1" / "training_state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no earlier complete checkpoint in"):
        load_checkpoint(out, model=tiny())


def test_old_checkpoint_without_checksums_still_loads(source_dir, tmp_path, caplog):
    model = load_source(tiny(), source_dir)
    step_dir = save_checkpoint(tmp_path / "out", 1, model=model, source_checkpoint_dir=source_dir)
    meta_file = step_dir / "packrl_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    del meta["checksums"]  # as packrl wrote them before checksums
    meta_file.write_text(json.dumps(meta))
    fresh = tiny(seed=3)
    with caplog.at_level("INFO", logger="packrl.checkpointing"):
        assert load_checkpoint(step_dir, model=fresh)["step"] == 1
    assert "has no checksums" in caplog.text and "unverified" in caplog.text
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    # unverified, a truncated weights file still gets an error naming it (not a bare
    # SafetensorError)
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{weights} is corrupt or truncated"):
        load_checkpoint(step_dir, model=tiny())


def _unshare_tmpfs_works() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rmdir $d"
    try:
        return subprocess.run(["unshare", "-Urm", "sh", "-c", probe]).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _unshare_tmpfs_works(), reason="cannot mount a tmpfs in a namespace")
def test_full_disk_names_the_path_and_space_and_keeps_latest(source_dir, tmp_path):
    """A real full disk: a 320 KiB tmpfs, mounted in a private mount namespace. Step 1 (104 KB)
    fits. Step 2 with AdamW state (285 KB) does not, and is refused before writing; step 3
    fits but the disk fills up while its training state is written (another writer takes the
    space). Both leave `latest` at step 1, which loads, and no debris."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(
        f"""
        import json, os, shutil, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_checkpointing import tiny, load_source, setup_training, train_step
        from packrl.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
        from packrl.checkpointing import save as writer
        src, disk = Path({str(source_dir)!r}), Path({str(disk)!r})
        out = disk / "out"
        model = load_source(tiny(), src)
        save_checkpoint(out, 1, model=model, source_checkpoint_dir=src)
        errors = []
        opt, sched = setup_training(model)
        train_step(model, opt, sched)  # AdamW state: 2 more copies of the weights
        try:
            save_checkpoint(out, 2, model=model, source_checkpoint_dir=src, optimizer=opt)
        except CheckpointError as e:
            errors.append(str(e))
        real_save = writer._save_training_state
        def fill_then_save(path, state):  # someone else fills the disk mid-save
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(bytes(4096)); f.flush()
                except OSError:
                    pass
            real_save(path, state)
        writer._save_training_state = fill_then_save
        try:
            save_checkpoint(out, 3, model=model, source_checkpoint_dir=src)
        except CheckpointError as e:
            errors.append(str(e))
        (disk / "filler").unlink()
        print(json.dumps({{
            "errors": errors,
            "listing": sorted(p.name for p in out.iterdir()),
            "loaded_step": load_checkpoint(out, model=tiny(seed=5))["step"],
        }}))
        """
    )
    mount = f'mount -t tmpfs -o size=320k tmpfs {disk} && exec {sys.executable} -c "$0"'
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", mount, script], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    refused, mid_save = result["errors"]
    out = disk / "out"
    assert f"cannot save checkpoint {out / 'step_2'}: not enough space" in refused
    assert "(checked before writing)" in refused
    needed = float(re.search(r"needs about ([\d.]+) MB", refused).group(1))
    assert 0.24 < needed < 0.29  # weights + AdamW's two moments of 21k fp32 parameters
    assert f"{out / 'latest'} still points at step_1" in refused
    assert f"cannot save checkpoint {out / 'step_3'}: not enough space" in mid_save
    assert "while writing it" in mid_save and "0.00 MB is free" in mid_save
    assert result["listing"] == ["latest", "step_1"] and result["loaded_step"] == 1


def test_one_process_save_hands_tensors_through_without_copies(source_dir):
    """gather_to_rank0 (what save_checkpoint writes from) returns CPU tensors as they are:
    a copy of the model and its AdamW states added 1.6 GB at every save of SmolLM2-135M."""
    model = load_source(tiny(), source_dir)
    opt, sched = setup_training(model)
    train_step(model, opt, sched)
    state = gather_to_rank0(model.state_dict())
    for name, t in model.state_dict().items():
        assert state[name].data_ptr() == t.data_ptr(), name
    opt_state = gather_to_rank0(opt.state_dict())
    for i, per_param in opt.state_dict()["state"].items():
        for name, t in per_param.items():
            assert opt_state["state"][i][name].data_ptr() == t.data_ptr(), (i, name)
