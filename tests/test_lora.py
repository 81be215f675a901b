"""LoRA adapters on the language model (SIU's paper setting), alone and under 2 ZeRO-3 ranks."""

from __future__ import annotations

import json

import pytest
import torch

from dsunlearn.config import LoraConfig, MethodConfig
from dsunlearn.data.builtin import read_appearances
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.errors import ConfigError
from dsunlearn.methods import build_method
from dsunlearn.models import encode_examples, load_model_and_processor
from dsunlearn.models.lora import apply_lora, default_lora_targets
from tests.conftest import DS_CONFIG, REPO, run_deepspeed, save_random_tiny


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_default_targets_are_the_language_models_linears(family):
    model, _ = load_model_and_processor(family, seed=0)
    targets = default_lora_targets(model)
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert not any("lm_head" in t or "visual" in t or "vision" in t for t in targets)
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
    ]
    assert sorted(targets) == sorted(linears)

    wrapped = apply_lora(model, LoraConfig(r=4))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_adapters_are_seeded():
    """Every rank must create the same adapters before ZeRO-3 partitions them."""

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        model, _ = load_model_and_processor("tiny-llava", seed=0)
        torch.manual_seed(1234 + seed)  # whatever the global RNG holds by then
        wrapped = apply_lora(model, LoraConfig(r=4), seed=7)
        return {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}

    a, b = adapters(0), adapters(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(a[n].abs().sum() > 0 for n in a if ".lora_A." in n)


def test_r0_is_full_fine_tuning_and_bad_settings_fail():
    model, _ = load_model_and_processor("tiny-llava", seed=0)
    assert apply_lora(model, LoraConfig(r=0)) is model
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(model, LoraConfig(r=4, target_modules=["no_such_proj"]))
    with pytest.raises(ConfigError, match="dropout"):
        apply_lora(model, LoraConfig(r=4, dropout=1.5))
    picked = apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    names = [n for n, p in picked.named_parameters() if p.requires_grad]
    assert names and all("q_proj" in n for n in names)


def test_siu_fused_equals_eager_on_lora_adapters(small_bench):
    bench = load_benchmark(str(small_bench))
    bench.appearance = read_appearances(small_bench)
    base, processor = load_model_and_processor("tiny-llava", seed=0)
    model = apply_lora(base, LoraConfig(r=4))
    for n, p in model.named_parameters():  # non-zero B so the adapters change the output
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.02)
    ref, _ = load_model_and_processor("tiny-llava", seed=0)
    ref.requires_grad_(False)
    grads = {}
    for impl in ("eager", "fused"):
        method = build_method("siu", MethodConfig(siu_loss=impl))
        batch = encode_examples(processor, method.forget_examples(bench, processor)[:6])
        model.zero_grad()
        method.forget_loss(model, batch, ref).backward()
        method.before_step(None)
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"] and set(grads["eager"]) == set(grads["fused"])
    assert all(".lora_" in n for n in grads["fused"])  # the frozen lm_head gets no gradient
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["fused"][n], g, atol=1e-5, rtol=5e-4, msg=n)


@pytest.mark.slow
def test_lora_siu_and_ga_on_two_zero3_ranks(tmp_path, small_bench):
    vanilla = save_random_tiny("tiny-llava", tmp_path / "vanilla")
    args = [
        "unlearn",
        "--config",
        "configs/demo.yaml",
        "name=lora",
        f"out_dir={tmp_path}",
        f"data.path={small_bench}",
        f"vanilla={vanilla}",
        "methods=[siu,ga]",
        "method.siu_steps=3",
        "optim.steps=3",
        "peft.lora.r=4",
        "eval.enabled=false",
        f"deepspeed={DS_CONFIG}",
    ]
    proc = run_deepspeed(2, args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curves = json.loads((tmp_path / "lora" / "losses.json").read_text())
    assert [len(curves[m]) for m in ("siu", "ga")] == [3, 3]
    assert curves["siu"][-1]["forget_loss"] < curves["siu"][0]["forget_loss"]
    assert curves["ga"][-1]["forget_loss"] < curves["ga"][0]["forget_loss"]  # -CE goes down
