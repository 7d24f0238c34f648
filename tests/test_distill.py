"""Distillation losses against float64 references, a tiny KD training run, teacher preparation (incl. ZeRO-3)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from sparsegpt.core.errors import UserError
from sparsegpt.heal.distill import (
    KDConfig,
    check_compatible,
    kd_loss,
    logit_kl,
    prepare_teacher,
    squarehead,
    teacher_ds_config,
)

torch.set_num_threads(1)
VOCAB = 96


def tiny_llama(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))


def kl_reference(student, teacher, temperature, mask):
    """Direct float64 reference: F.kl_div per token, masked mean, × T²."""
    log_s = F.log_softmax(student.double() / temperature, -1)
    log_t = F.log_softmax(teacher.double() / temperature, -1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    m = mask.double()
    return (per_token * m).sum() / m.sum() * temperature**2


def test_logit_kl_zero_for_identical_logits():
    logits = torch.randn(2, 5, VOCAB) * 4
    assert logit_kl(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_kl_matches_float64_reference_value_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 7, VOCAB, generator=g) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(3, 7, VOCAB, generator=g) * 3).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, :2] = 0
    # chunk_tokens=4 splits the 21 tokens into uneven chunks that cross rows of the batch
    got = logit_kl(student, teacher, 2.5, mask, chunk_tokens=4)
    assert got.dtype == torch.float32 and got.item() >= 0
    got.backward()
    leaf = student.detach().double().requires_grad_(True)
    ref = kl_reference(leaf, teacher, 2.5, mask)
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), leaf.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)
    assert torch.all(student.grad[0, 5:] == 0)  # padding gets no gradient


def test_logit_kl_without_mask_is_plain_mean_and_errors():
    student, teacher = torch.randn(2, 4, VOCAB), torch.randn(2, 4, VOCAB)
    ref = kl_reference(student, teacher, 1.0, torch.ones(2, 4))
    assert logit_kl(student, teacher, 1.0).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(UserError, match="teacher logits"):
        logit_kl(student, teacher[..., :-1], 1.0)
    with pytest.raises(UserError, match="no real token"):
        logit_kl(student, teacher, 1.0, torch.zeros(2, 4))
    with pytest.raises(UserError, match="temperature"):
        logit_kl(student, teacher, 0.0)


def test_squarehead_matches_reference():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, 6, 16, generator=g) * s for s in (0.5, 3.0, 10.0)]
    student = [t + torch.randn(t.shape, generator=g) for t in teacher]
    ref = torch.stack([F.mse_loss(s.double(), t.double()) / F.mse_loss(t.double(), torch.zeros_like(t.double()))
                       for s, t in zip(student, teacher)]).mean()
    assert squarehead(student, teacher).item() == pytest.approx(ref.item(), rel=1e-5)
    assert squarehead(teacher, [t.clone() for t in teacher]).item() == 0.0
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    keep = mask.bool()
    ref_masked = torch.stack([F.mse_loss(s[keep].double(), t[keep].double()) / t[keep].double().pow(2).mean()
                              for s, t in zip(student, teacher)]).mean()
    assert squarehead(student, teacher, mask).item() == pytest.approx(ref_masked.item(), rel=1e-5)
    with pytest.raises(UserError, match="number of layers"):
        squarehead(student, teacher[:2])


def test_kd_loss_combines_weighted_parts():
    student, teacher = tiny_llama(0), tiny_llama(1)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    s_out = student(ids, labels=ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    cfg = KDConfig(logit_weight=0.5, hidden_weight=2.0, temperature=2.0, ce_weight=0.25, layers=[1])
    total, parts = kd_loss(s_out, t_out, s_out.loss, cfg)
    kl = logit_kl(s_out.logits, t_out.logits, 2.0)
    sq = squarehead(s_out.hidden_states[2:3], t_out.hidden_states[2:3])
    assert set(parts) == {"ce", "kd_logit", "kd_hidden", "loss"}
    assert parts["kd_logit"] == pytest.approx(kl.item(), rel=1e-6)
    assert parts["kd_hidden"] == pytest.approx(sq.item(), rel=1e-6)
    assert total.item() == pytest.approx(0.25 * s_out.loss.item() + 0.5 * kl.item() + 2.0 * sq.item(), rel=1e-6)
    assert parts["loss"] == pytest.approx(total.item(), rel=1e-6)
    with pytest.raises(UserError, match="output_hidden_states=True"):
        kd_loss(student(ids), t_out, None, KDConfig(hidden_weight=1.0, ce_weight=0.0))
    with pytest.raises(UserError, match="cross-entropy"):
        kd_loss(s_out, t_out, None, KDConfig(logit_weight=1.0))


def test_kd_config_validation():
    for bad in (dict(temperature=0), dict(logit_weight=-1), dict(ce_weight=0), dict(layers=[]), dict(layers="last")):
        with pytest.raises(UserError):
            KDConfig(**bad)


def test_kd_training_decreases_losses():
    student, teacher = tiny_llama(0), tiny_llama(1)
    teacher = prepare_teacher(teacher, Accelerator(cpu=True))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    cfg = KDConfig(logit_weight=1.0, hidden_weight=1.0, temperature=2.0, ce_weight=0.0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for _ in range(8):
        total, parts = kd_loss(student(ids, output_hidden_states=True), t_out, None, cfg)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(parts)
    assert all(torch.isfinite(torch.tensor(list(p.values()))).all() for p in history)
    for key in ("kd_logit", "kd_hidden", "loss"):
        assert history[-1][key] < 0.8 * history[0][key], (key, history[0][key], history[-1][key])
    assert all(p.grad is None for p in teacher.parameters())


def test_check_compatible():
    student = tiny_llama(0)
    with pytest.raises(UserError, match=f"teacher vocab 128 != student vocab {VOCAB}"):
        check_compatible(student, tiny_llama(1, vocab_size=128))
    wider = tiny_llama(1, hidden_size=64, intermediate_size=128)
    check_compatible(student, wider, KDConfig(logit_weight=1.0))  # logit KD only: fine
    with pytest.raises(UserError, match="teacher hidden_size 64 != student hidden_size 32"):
        check_compatible(student, wider, KDConfig(hidden_weight=1.0))
    with pytest.raises(UserError, match="num_hidden_layers 3 != student num_hidden_layers 2"):
        check_compatible(student, tiny_llama(1, num_hidden_layers=3), KDConfig(hidden_weight=1.0))
    with pytest.raises(UserError, match="out of range"):
        check_compatible(student, tiny_llama(1), KDConfig(hidden_weight=1.0, layers=[2]))


def test_prepare_teacher_single_process_freezes_and_moves():
    accelerator = Accelerator(cpu=True)
    teacher = tiny_llama(1, attention_dropout=0.5)
    teacher.train()
    prepared = prepare_teacher(teacher, accelerator)
    assert not any(p.requires_grad for p in prepared.parameters())
    assert not any(m.training for m in prepared.modules())
    assert all(p.device == accelerator.device for p in prepared.parameters())
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(prepared(ids).logits, prepared(ids).logits, rtol=0, atol=0)  # no dropout


def test_teacher_ds_config_is_inference_only_zero3():
    student_cfg = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4, "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": 1000,
                              "reduce_bucket_size": "auto"},
    }
    assert teacher_ds_config(student_cfg, hidden_size=100) == {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "stage3_prefetch_bucket_size": 9000,
                              "stage3_param_persistence_threshold": 1000},
    }


ZERO3_SCRIPT = textwrap.dedent("""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from transformers import LlamaConfig, LlamaForCausalLM
    from sparsegpt.heal.distill import prepare_teacher
    torch.set_num_threads(1)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        expected = teacher(ids, output_hidden_states=True)
    engine = prepare_teacher(teacher, accelerator)
    params = list(engine.module.parameters())
    assert all(p.numel() == 0 and p.ds_numel > 0 for p in params), "teacher parameters are not ZeRO-3 partitioned"
    assert not any(p.requires_grad for p in params)
    assert not any(m.training for m in engine.module.modules())
    with torch.no_grad():
        got = engine(ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    print("ZERO3_OK")
""")


@pytest.mark.slow
def test_prepare_teacher_shards_under_zero3(tmp_path: Path):
    with socket.socket() as s:  # a free port: other test runs may share this machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "true"}
    script = tmp_path / "zero3_teacher.py"
    script.write_text(ZERO3_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert "ZERO3_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
