"""discriminator.py: the hinge and R1 losses against per-sample references, the U-Net discriminator built from
the tiny teacher, the projected discriminator on a tiny random DINOv2 (nothing downloaded), logits and losses in fp32
under bf16 autocast, both discriminators on an SDXL-layout teacher (the packed extras row), and a short distillation
run with each."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import distill
import processes
from conditioning import pack_sdxl_cond
from discriminator import (ProjectedDiscriminator, TokenHead, UNetDiscriminator, d_hinge_loss, disc_loss,
                           g_hinge_loss, make_discriminator, r1_penalty)
from pipeline import load_pipeline
from schedule import VPSchedule
from toyteacher import TINY, gen, make_dinov2, snapshot, tiny_args, tiny_encoder
from unet import UNet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return make_dinov2(str(tmp_path_factory.mktemp("dinov2")))


def tiny_vit():
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=4, image_size=16))


def cond_for(labels):
    return tiny_encoder()(torch.tensor(labels))  # (B, 1, 16)


# --------------------------------------------------------------------------------------------------
# losses, per sample
# --------------------------------------------------------------------------------------------------
def test_hinge_losses_per_sample():
    real = torch.tensor([-2.0, -0.5, 0.3, 1.0, 1.7])
    fake = torch.tensor([1.5, -1.0, -3.0, 0.2, 0.0])
    ref_d = [max(0.0, 1 - r) + max(0.0, 1 + f) for r, f in zip(real.tolist(), fake.tolist())]
    torch.testing.assert_close(d_hinge_loss(real, fake), torch.tensor(ref_d))
    torch.testing.assert_close(g_hinge_loss(fake), torch.tensor([-f for f in fake.tolist()]))


def test_r1_penalty_matches_a_per_sample_loop():
    torch.manual_seed(0)
    D = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3), nn.Flatten(), nn.Softplus())

    def logits(x):
        return D(x).pow(2).mean(1)  # (B,), nonlinear in x

    x = torch.randn(4, 3, 5, 5, generator=gen(0)).requires_grad_(True)
    out = r1_penalty(logits(x), x)
    ref = []
    for i in range(4):
        xi = x[i:i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(logits(xi).sum(), xi)
        ref.append(g.pow(2).sum())
    assert out.shape == (4,)
    torch.testing.assert_close(out, torch.stack(ref))
    out.sum().backward()  # create_graph: the penalty trains D
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())


# --------------------------------------------------------------------------------------------------
# the U-Net discriminator
# --------------------------------------------------------------------------------------------------
def test_unet_discriminator_is_the_teachers_encoder_plus_heads(teacher):
    t_unet = load_pipeline(teacher).unet
    t_before = {k: v.clone() for k, v in t_unet.state_dict().items()}
    torch.manual_seed(0)
    disc = UNetDiscriminator(t_unet)
    assert not hasattr(disc.encoder, "up_blocks") and not hasattr(disc.encoder, "conv_out")
    assert len(disc.heads) == 3  # two down levels + the mid block
    assert all(p.requires_grad for p in disc.parameters())
    x = torch.randn(4, 3, 8, 8, generator=gen(0))
    s, cond = torch.tensor([0, 100, 400, 700]), cond_for([0, 3, 7, 11])
    # the encoder starts as an exact copy of the teacher's
    for a, b in zip(disc.encoder.encode(x, s, cond), t_unet.encode(x, s, cond)):
        torch.testing.assert_close(a, b)
    logits = disc(x, s, cond)
    assert logits.shape == (4,)
    assert (disc(x, s, cond_for([1, 4, 8, 2])) - logits).abs().min() > 1e-6  # depends on the condition
    assert (disc(x, s + 200, cond) - logits).abs().min() > 1e-6  # and on the diffusion-GAN timestep
    logits.sum().backward()
    # every parameter is used (DDP's requirement), the teacher is a separate, untouched copy
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in t_unet.parameters())
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, t_before[k]) for k, v in t_unet.state_dict().items())


# --------------------------------------------------------------------------------------------------
# the projected discriminator on a frozen ViT
# --------------------------------------------------------------------------------------------------
def test_projected_discriminator_frozen_vit_gradient_reaches_the_image():
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(tiny_vit(), cond_dim=16).train()
    assert disc.layers == (1, 2) and len(disc.heads) == 2
    assert not disc.vit.training  # the frozen ViT stays in eval mode inside a training discriminator
    assert all(not p.requires_grad for p in disc.vit.parameters())
    x = (torch.rand(3, 3, 8, 8, generator=gen(0)) * 2 - 1).requires_grad_(True)  # any size: resized to 16
    cond = cond_for([0, 5, 9])
    logits = disc(x, None, cond)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's gradient path
    assert all(p.grad is None for p in disc.vit.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    with torch.no_grad():
        assert (disc(x, None, cond_for([1, 6, 10])) - logits).abs().min() > 1e-6  # conditioned by projection


def test_token_head_condition_projection():
    torch.manual_seed(0)
    head = TokenHead(32, cond_dim=16, hidden=8)
    tokens = torch.randn(2, 17, 32, generator=gen(0))
    c = torch.randn(2, 16, generator=gen(1))
    out = head(tokens, c)
    assert out.shape == (2,)
    assert (head(tokens, c * -1.0) - out).abs().min() > 1e-6
    # ⟨h(tokens), W c⟩ / sqrt(d), averaged over tokens, by hand
    with torch.no_grad():
        h = head.out(head.net(tokens.transpose(1, 2)))  # (B, 8, N)
        ref = torch.stack([(h[i].T @ head.cond_proj(c[i])).mean() / 8 ** 0.5 for i in range(2)])
    torch.testing.assert_close(out.detach(), ref)
    plain = TokenHead(32, cond_dim=None, hidden=8)
    assert plain.cond_proj is None and plain(tokens, None).shape == (2,)


def test_projected_from_pretrained_folder(vit_folder):
    disc = ProjectedDiscriminator.from_pretrained(vit_folder, cond_dim=16)
    assert disc.image_size == 16 and all(not p.requires_grad for p in disc.vit.parameters())
    assert disc(torch.zeros(2, 3, 8, 8), None, cond_for([0, 1])).shape == (2,)


# --------------------------------------------------------------------------------------------------
# logits and losses in fp32 under bf16 autocast
# --------------------------------------------------------------------------------------------------
def test_logits_and_losses_are_fp32_under_bf16_autocast(teacher):
    torch.manual_seed(0)
    unet_disc = UNetDiscriminator(load_pipeline(teacher).unet)
    projected = ProjectedDiscriminator(tiny_vit(), cond_dim=16)
    x, s, cond = torch.randn(2, 3, 8, 8, generator=gen(0)), torch.tensor([10, 500]), cond_for([0, 3])
    schedule = VPSchedule("scaled_linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet_disc.encoder.encode(x, s, cond)[-1].dtype == torch.bfloat16  # the networks do run in bf16
        for disc in (unet_disc, projected):
            logits = disc(x, s, cond)
            assert logits.dtype == torch.float32, type(disc).__name__
            terms = disc_loss(disc, schedule, x, x.flip(0), s, torch.randn_like(x), torch.randn_like(x), cond, r1=0.1)
            assert {k: v.dtype for k, v in terms.items()} == {"d": torch.float32, "r1": torch.float32}
        low = torch.tensor([0.3, -1.2], dtype=torch.bfloat16)  # even from bf16 logits, the losses come out fp32
        assert d_hinge_loss(low, low).dtype == g_hinge_loss(low).dtype == torch.float32


def test_heads_run_in_fp32_with_bf16_weights(teacher):
    """FSDP2 with --bf16 gathers a layer's weights in bf16: the heads' fp32 region must cast them up too (else
    "Input type (float) and bias type (BFloat16)"), and give what the fp32 weights give, to bf16's rounding of them."""
    torch.manual_seed(0)
    unet_disc = UNetDiscriminator(load_pipeline(teacher).unet)
    projected = ProjectedDiscriminator(tiny_vit(), cond_dim=16)
    x, s, cond = torch.randn(2, 3, 8, 8, generator=gen(0)), torch.tensor([10, 500]), cond_for([0, 3])
    for disc in (unet_disc, projected):
        ref = disc(x, s, cond)
        heads = [m for m in disc.modules() if type(m).__name__ in ("ConvHead", "TokenHead")]
        assert heads, type(disc).__name__
        for head in heads:  # as FSDP2's mixed precision hands them over: bf16 copies
            head.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = disc(x, s, cond)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------------------------------
# an SDXL-layout teacher: cond (B, L + 1, D), the extras row (pooled embedding + 6 time ids) last
# --------------------------------------------------------------------------------------------------
POOLED, TIME_DIM = 8, 4  # pooled 8 + 6 time ids of 4 = add_embedding's 32 inputs; the row: 8 + 6 ≤ D = 16
TINY_SDXL = dict(TINY, transformer_layers_per_block=[1, 2], use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)


def sdxl_cond(labels, size=1024.0, pooled_seed=0):
    tokens = cond_for(labels)  # (B, 1, 16)
    pooled = torch.randn(len(labels), POOLED, generator=gen(pooled_seed))
    time_ids = torch.tensor([size, size, 0.0, 0.0, size, size]).expand(len(labels), 6)
    return tokens, pack_sdxl_cond(tokens, pooled, time_ids)  # (B, 2, 16)


def test_projected_discriminator_averages_only_the_token_rows_of_sdxl_cond(vit_folder):
    torch.manual_seed(0)
    teacher = UNet(TINY_SDXL)
    disc = make_discriminator("projected", teacher, SimpleNamespace(dim=16), vit_folder, False, "cpu")
    assert disc.pooled_dim == teacher.pooled_dim == POOLED
    plain = copy.deepcopy(disc)
    plain.pooled_dim = None  # the same heads, reading cond as all tokens (as before: the extras row averaged in)
    x = torch.rand(3, 3, 8, 8, generator=gen(0)) * 2 - 1
    tokens, cond = sdxl_cond([0, 5, 9])
    with torch.no_grad():
        logits = disc(x, None, cond)
        torch.testing.assert_close(logits, plain(x, None, tokens))  # = the token rows alone
        torch.testing.assert_close(disc(x, None, sdxl_cond([0, 5, 9], size=512.0, pooled_seed=1)[1]), logits)
        assert (plain(x, None, cond) - logits).abs().min() > 1e-3  # the extras row would have moved every logit
        assert (disc(x, None, sdxl_cond([1, 6, 10])[1]) - logits).abs().min() > 1e-6  # still conditioned on the text
    toy = make_discriminator("projected", UNet(TINY), SimpleNamespace(dim=16), vit_folder, False, "cpu")
    assert toy.pooled_dim is None  # a teacher without the extras row: every row is a token


def test_unet_discriminator_on_an_sdxl_teacher_reads_the_extras_row():
    torch.manual_seed(0)
    teacher = UNet(TINY_SDXL).eval()
    with torch.no_grad():
        for p in teacher.parameters():  # random init leaves some layers at zero: perturb everything
            p.add_(0.05 * torch.randn(p.shape, generator=gen(1)))
    disc = make_discriminator("unet", teacher, None, "", True, "cpu")
    assert disc.encoder.gradient_checkpointing == "block" and disc.encoder.pooled_dim == POOLED
    x, s = torch.randn(2, 3, 8, 8, generator=gen(0)), torch.tensor([10, 500])
    _, cond = sdxl_cond([0, 3])
    for a, b in zip(disc.encoder.encode(x, s, cond), teacher.encode(x, s, cond)):  # the teacher's added embedding
        torch.testing.assert_close(a, b)
    logits = disc(x, s, cond)
    with torch.no_grad():
        assert (disc(x, s, sdxl_cond([0, 3], size=512.0)[1]) - logits).abs().min() > 1e-6  # the time ids reach D
        assert (disc(x, s, sdxl_cond([0, 3], pooled_seed=1)[1]) - logits).abs().min() > 1e-6  # and the pooled text
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.encoder.add_embedding.parameters())


# --------------------------------------------------------------------------------------------------
# short distillation runs with each discriminator
# --------------------------------------------------------------------------------------------------
def test_projected_disc_distillation_offline(teacher, vit_folder, tmp_path):
    # --recon none: the student learns from the adversarial term alone, so it can only move if the
    # generator's gradient crosses the frozen ViT
    cfg, _ = distill.parse_args(tiny_args(teacher, str(tmp_path), "--disc", "projected", "--disc-vit", vit_folder,
                                          "--recon", "none", "--r1", "0.1", "--lr", "1e-3", "--lr-disc", "1e-3"))
    d = distill.build(cfg, processes.Dist())
    assert isinstance(d.disc, ProjectedDiscriminator)
    assert {id(p) for g in d.opt_d.param_groups for p in g["params"]} == {id(p) for p in d.disc.heads.parameters()}
    student, vit, heads = snapshot(d.student), snapshot(d.disc.vit), snapshot(d.disc.heads)
    for _ in range(2):
        logs = d.train_step()
        assert set(logs) == {"adv_g", "d", "r1", "t", "grad_norm"}  # R1 through the ViT's attention: a double backward
    assert not all(torch.equal(v, student[k]) for k, v in d.student.state_dict().items())
    assert all(torch.equal(v, vit[k]) for k, v in d.disc.vit.state_dict().items())
    assert not all(torch.equal(v, heads[k]) for k, v in d.disc.heads.state_dict().items())
    assert all(not p.requires_grad for p in d.disc.vit.parameters())


def test_unet_disc_distillation_with_r1(teacher, tmp_path):
    cfg, _ = distill.parse_args(tiny_args(teacher, str(tmp_path), "--r1", "0.1", "--steps", "2"))
    d = distill.build(cfg, processes.Dist())
    assert isinstance(d.disc, UNetDiscriminator)
    logs = d.train_step()
    assert set(logs) == {"recon", "adv_g", "d", "r1", "t", "grad_norm"} and logs["r1"] > 0
