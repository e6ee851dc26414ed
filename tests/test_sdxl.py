"""The SDXL layout on a tiny random SDXL-style folder written with diffusers and transformers (nothing is downloaded):
the U-Net with addition_embed_type "text_time" against diffusers, the two-tower conditioning against transformers
called directly (and the null condition against diffusers' own SDXL pipeline), the packed cond's one-line errors, and
the folder through load_pipeline and one distillation step.

    sdxl/  unet/            diffusers UNet2DConditionModel, SDXL's options: a plain first level, linear projections,
                            1/2 transformer layers, heads per level, text_time (pooled 24 + 6 time ids × 4 = 48)
           vae/             tests/sdfolder.py's tiny AutoencoderKL (downscale 2): 16 px images ↔ 4×8×8 latents
           text_encoder/    CLIPTextModel (width 32)                     tokenizer/    tests/sdfolder.py's CLIP BPE
           text_encoder_2/  CLIPTextModelWithProjection (width 48, projection 24)   tokenizer_2/ the same BPE
           scheduler/       EulerDiscreteScheduler, SDXL's scaled_linear β 0.00085 → 0.012
"""
import json
import os

import pytest
import torch

import distill
from conditioning import SDXLTextEncoder, load_conditioning, pack_sdxl_cond
from pipeline import load_pipeline
from sdfolder import IMAGE_SIZE, write_caption_folder, write_clip_tokenizer, write_vae
from unet import CONFIGS, UNet, count_params, unpack_sdxl_cond

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

DIM_1, DIM_2, POOLED, TIME_DIM = 32, 48, 24, 4
D = DIM_1 + DIM_2  # 80: the U-Net's cross_attention_dim
PROMPTS = ["a red cat", "a dog on a mat", "cat cat cat cat cat cat cat dog"]  # the last one is truncated (8 tokens)


def tiny_sdxl_unet_config() -> dict:
    return dict(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], use_linear_projection=True,
                cross_attention_dim=D, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, norm_num_groups=8)


def write_sdxl_folder(folder: str, seed: int = 0) -> str:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    with torch.no_grad():  # random init leaves some layers at zero (conv_out, proj_out): perturb everything
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(os.path.join(folder, "unet"))
    write_vae(os.path.join(folder, "vae"), seed)
    for sub, cls, width in (("", CLIPTextModel, DIM_1), ("_2", CLIPTextModelWithProjection, DIM_2)):
        vocab_size = write_clip_tokenizer(os.path.join(folder, "tokenizer" + sub))
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                eos_token_id=1, pad_token_id=1, projection_dim=POOLED)
        cls(config).eval().save_pretrained(os.path.join(folder, "text_encoder" + sub))
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]},
                  f)
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_sdxl_folder(str(tmp_path_factory.mktemp("sdxl") / "sdxl"))


def _inputs(batch=2, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    hidden = torch.randn(batch, tokens, D, generator=g)
    pooled = torch.randn(batch, POOLED, generator=g)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [1024, 768, 32, 8, 512, 512]])[:batch]
    return x, hidden, pooled, time_ids


# --------------------------------------------------------------------------------------------------
# the U-Net
# --------------------------------------------------------------------------------------------------
def test_unet_matches_diffusers_with_added_conditions(sdxl):
    ref = diffusers.UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet").eval()
    ours = UNet.from_pretrained(sdxl, subfolder="unet")
    assert ours.pooled_dim == POOLED and "add_embedding.linear_1.weight" in ours.state_dict()
    x, hidden, pooled, time_ids = _inputs()
    t = torch.tensor([999, 10])
    mid = []
    ref.mid_block.register_forward_hook(lambda m, i, o: mid.append(o))
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=hidden,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        cond = pack_sdxl_cond(hidden, pooled, time_ids)
        assert cond.shape == (2, 6, D)
        got = ours(x, t, cond)
        features = ours.encode(x, t, cond)  # the discriminator's encoder gets the same added embedding
        other = ours(x, t, pack_sdxl_cond(hidden, pooled, time_ids.flip(0)))
    assert expected.abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-5
    assert (features[-1] - mid[0]).abs().max() <= 1e-5
    assert (other - got).abs().max() > 1e-3  # the time ids reach the output


def test_pack_and_unpack_are_inverse():
    _, hidden, pooled, time_ids = _inputs()
    cond = pack_sdxl_cond(hidden, pooled, time_ids)
    tokens, p, ids = unpack_sdxl_cond(cond, POOLED)
    assert torch.equal(tokens, hidden) and torch.equal(p, pooled) and torch.equal(ids, time_ids)
    assert torch.equal(cond[:, -1, POOLED + 6:], torch.zeros(2, D - POOLED - 6))
    # what every method does to cond: concatenate, slice on the batch dim, cast
    both = torch.cat([cond, cond.flip(0)]).to(torch.bfloat16)
    assert torch.equal(unpack_sdxl_cond(both[2:3].float(), POOLED)[2], time_ids[1:])  # time ids exact in bf16


def test_wrong_size_packed_cond_is_one_line():
    torch.manual_seed(0)
    net = UNet(dict(tiny_sdxl_unet_config(), _class_name="UNet2DConditionModel")).eval()
    x, hidden, pooled, time_ids = _inputs()
    for cond in (torch.randn(2, 6, D - 1), torch.randn(2, 1, D)):
        with pytest.raises(ValueError, match="L \\+ 1") as e:
            net(x, 5, cond)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="do not fit"):
        pack_sdxl_cond(hidden[..., :POOLED + 5], pooled, time_ids)
    with pytest.raises(ValueError, match="time_ids"):
        pack_sdxl_cond(hidden, pooled, time_ids[:, :5])
    for bad in (dict(addition_time_embed_dim=None), dict(projection_class_embeddings_input_dim=D + 6 * TIME_DIM)):
        with pytest.raises(ValueError, match="text_time"):
            UNet(dict(tiny_sdxl_unet_config(), _class_name="UNet2DConditionModel", **bad))


def test_full_size_sdxl_layout_is_diffusers():
    cfg = CONFIGS["sdxl"]
    with torch.device("meta"):  # shapes only: no memory, no init
        ours = UNet(cfg)
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert count_params(ours) == count_params(ref) == 2_567_463_684


# --------------------------------------------------------------------------------------------------
# the conditioning
# --------------------------------------------------------------------------------------------------
def test_conditioning_matches_transformers(sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    enc = SDXLTextEncoder.from_pretrained(sdxl)
    assert enc.dim == D and enc.pooled_dim == POOLED and enc.image_size == IMAGE_SIZE and enc.max_length == 8
    cond = enc(PROMPTS)
    assert cond.shape == (3, 9, D)
    tokens, pooled, time_ids = unpack_sdxl_cond(cond, POOLED)
    # the reference, by hand: both towers' penultimate layers side by side, the second tower's projection
    hidden = []
    for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tok = CLIPTokenizer.from_pretrained(os.path.join(sdxl, "tokenizer" + sub))
        model = cls.from_pretrained(os.path.join(sdxl, "text_encoder" + sub)).eval()
        ids = tok(PROMPTS, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    assert torch.allclose(tokens, torch.cat(hidden, dim=-1), atol=1e-6)
    assert torch.allclose(pooled, out.text_embeds, atol=1e-6)
    assert torch.equal(time_ids, torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 3))
    assert not torch.allclose(tokens[0], tokens[1])
    # frozen, and rebuilt from its config
    assert not any(p.requires_grad for p in enc.parameters())
    again = load_conditioning(json.loads(json.dumps(enc.config())))
    assert isinstance(again, SDXLTextEncoder) and torch.equal(again(PROMPTS), cond)


def test_null_is_what_the_diffusers_sdxl_pipeline_uses(sdxl):
    enc = SDXLTextEncoder.from_pretrained(sdxl)
    null = enc.null(2)
    tokens, pooled, time_ids = unpack_sdxl_cond(null, POOLED)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl)
    _, neg, _, neg_pooled = pipe.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(tokens, neg.expand(2, -1, -1)) and torch.equal(pooled, neg_pooled.expand(2, -1))
    assert torch.equal(tokens, torch.zeros(2, 8, D))  # force_zeros_for_empty_prompt: zeros, not the embedding of ""
    assert torch.equal(time_ids, enc.time_ids(2, "cpu", torch.float32))  # the conditional time ids
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids[:1], ids)


# --------------------------------------------------------------------------------------------------
# the folder as a teacher
# --------------------------------------------------------------------------------------------------
def test_load_pipeline_and_distill_one_step(sdxl, tmp_path):
    pipe = load_pipeline(sdxl)
    assert isinstance(pipe.encoder, SDXLTextEncoder) and pipe.encoder.image_size == IMAGE_SIZE
    assert pipe.latent_shape() == (4, 8, 8) and pipe.unet.pooled_dim == POOLED
    captions = write_caption_folder(str(tmp_path / "captions"), n=4)
    out = tmp_path / "run"
    distill.main(["--method", "imagine_flash", "--preset", "t2i", "--teacher", sdxl, "--data", captions, "--out", str(out),
                  "--steps", "1", "--global-batch", "2", "--micro-batch", "2", "--k", "2", "--log-every", "1",
                  "--device", "cpu"])
    student = load_pipeline(str(out / "student"))  # its text encoders through pipeline.json → the teacher
    assert isinstance(student.encoder, SDXLTextEncoder) and student.unet.config == pipe.unet.config
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.state_dict().values(),
                                                            pipe.unet.state_dict().values()))
    assert moved > 0  # training happened
    # the exported student is an SDXL U-Net diffusers reads, with our numbers
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(out / "student"), subfolder="unet").eval()
    x, _, _, _ = _inputs()
    cond = student.encoder(PROMPTS[:2])
    tokens, pooled, time_ids = unpack_sdxl_cond(cond, POOLED)
    with torch.no_grad():
        expected = ref(x, torch.tensor([999, 500]), encoder_hidden_states=tokens,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = student.unet(x, torch.tensor([999, 500]), cond)
    assert (got - expected).abs().max() <= 1e-5


def test_sdxl_unet_with_a_plain_text_encoder_is_one_line(sdxl, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in os.listdir(sdxl):
        if name not in ("text_encoder_2", "tokenizer_2"):
            os.symlink(os.path.join(sdxl, name), folder / name)
    with pytest.raises(ValueError, match="SDXL") as e:
        load_pipeline(str(folder))
    assert "\n" not in str(e.value)
