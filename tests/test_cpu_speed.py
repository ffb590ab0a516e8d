import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from afinar.training import cpu_speed


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, num_labels=3,
                                                    pad_token_id=0, bos_token_id=1, eos_token_id=1))


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 5:], mask[2, 7:] = 0, 0  # right padding, as the tokenizers here pad
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_multiplier_keeps_one_minus_p_scaled_and_follows_torch_seed(p):
    torch.manual_seed(3)
    first = cpu_speed.dropout_multiplier(torch.Size([1000, 1000]), p)
    assert first.dtype == torch.float32 and first.shape == (1000, 1000)
    kept = first != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.003)
    assert torch.equal(first[kept], torch.full_like(first[kept], 1 / (1 - p)))
    torch.manual_seed(3)
    assert torch.equal(cpu_speed.dropout_multiplier(torch.Size([1000, 1000]), p), first)
    assert not torch.equal(cpu_speed.dropout_multiplier(torch.Size([1000, 1000]), p), first)  # the generator moved on


def test_fast_dropout_is_inverted_dropout_with_the_matching_gradient():
    x = torch.ones(200, 500, requires_grad=True)
    y = cpu_speed.fast_dropout(x, 0.2)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.8))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * m / (1 - p)) / dx = m / (1 - p) = y when x is ones
    assert torch.equal(cpu_speed.fast_dropout(x, 0.0), x)
    assert not cpu_speed.fast_dropout(x, 1.0).any()
    layer = cpu_speed.FastDropout(0.5).eval()
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_sdpa_when_dropout_keeps_everything(causal, padded):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = None
    if padded:  # a boolean mask (True = attend), as transformers' sdpa_mask builds it
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[1, :, :, 4:] = False
        if causal:
            mask &= torch.ones(6, 6, dtype=torch.bool).tril()
    module = torch.nn.Module()
    module.is_causal = causal
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, is_causal=causal)
    # p = 1e-9 keeps every element (the mask's resolution is 2^-16) but takes the eager path
    got, _ = cpu_speed.attention(module, q, k, v, mask, dropout=1e-9, is_causal=causal)
    assert got.shape == expected.shape == (2, 6, 4, 8)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_apply_keeps_evaluation_exact_and_training_reproducible(build):
    inputs = batch()
    model = build().eval()
    before = model(**inputs).logits
    changes = cpu_speed.apply(model)
    assert any("dropout layers" in change for change in changes)
    assert any("attention-weight dropout" in change for change in changes)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert torch.allclose(model(**inputs).logits, before, atol=1e-5)

    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(model(**inputs).loss)
    assert losses[0].item() == losses[1].item()
    losses[0].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1 and
               p.shape[0] != 100)  # every weight matrix but the (partly unused) embedding table gets a gradient
    cpu_speed.restore(model)
    assert model.config._attn_implementation == "sdpa"


def test_gpt2_activation_becomes_the_fused_kernel_with_the_same_values():
    model = tiny_gpt2().eval()
    inputs = batch()
    before = model(**inputs).logits
    assert any("gelu_new" in change for change in cpu_speed.apply(model))
    assert torch.allclose(model(**inputs).logits, before, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_lora_addmm_forward_matches_peft_in_values_and_gradients(build):
    from afinar.core.config import LoraArgs
    from afinar.training.trainer import apply_lora

    model = apply_lora(build(), LoraArgs(enabled=True, r=4, dropout=0.2), "SEQ_CLS")
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at initialisation, which would hide a wrong low-rank term
            torch.nn.init.normal_(parameter, std=0.5)
    changes = cpu_speed.apply(model)
    assert any("LoRA layers add their low-rank product" in change for change in changes)

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout masks in both runs
        loss = model(**batch()).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    model.train()
    fused_loss, fused_grads = loss_and_gradients()
    patched = [m for m in model.modules() if "forward" in vars(m)]
    for module in patched:  # peft's own forward, every other speed-up kept (the same masks)
        del module.forward
    peft_loss, peft_grads = loss_and_gradients()
    assert torch.allclose(fused_loss, peft_loss, atol=1e-6)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) >= 4  # A and B of 2+ layers
    for name, gradient in peft_grads.items():
        assert gradient.abs().sum() > 0 and torch.allclose(fused_grads[name], gradient, atol=1e-6), name
    cpu_speed.apply(model)
    cpu_speed.restore(model)  # what saving and merging go through
    assert len(patched) >= 2 and not any("forward" in vars(m) for m in model.modules())
