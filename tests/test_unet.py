"""unet.py against diffusers: tiny random diffusers models, saved with save_pretrained, must give the
same eps_hat through UNet.from_pretrained (and back); loading errors are one clear line; encode,
gradient checkpointing (per block and per layer: the same numbers; grad_ckpt.py's memory measurements) and the
full-size parameter counts."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import grad_ckpt
import unet as unet_module
from unet import CONFIGS, UNet, count_params

diffusers = pytest.importorskip("diffusers")

# Tiny configs that between them exercise every supported option.
UNCOND = {
    # DDPM-CIFAR10-like: sin/cos order and shift of DDPM, padding-0 downsampling, heads of 8 channels.
    "ddpm_like": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, norm_eps=1e-6, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1),
    # One head per block (attention_head_dim None), scale-shift time conditioning (the mid attention then
    # has no GroupNorm), a mid-block scale factor, three levels, 2 ResNets per block, padding 1.
    "scale_shift": dict(
        sample_size=16, in_channels=4, out_channels=2, block_out_channels=(16, 16, 32), layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), attention_head_dim=None,
        norm_num_groups=4, resnet_time_scale_shift="scale_shift", mid_block_scale_factor=1.414,
        downsample_padding=1),
}
COND = {
    # SD-1.x-like: conv projections, attention_head_dim = number of heads.
    "sd1_like": dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=24,
        norm_num_groups=8),
    # SD-2.x-like: linear projections, heads per level, 2 transformer layers, padding 0, 2 ResNets.
    "sd2_like": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), cross_attention_dim=40, use_linear_projection=True,
        transformer_layers_per_block=2, downsample_padding=0, upcast_attention=True, norm_num_groups=8),
    "toy": {k: v for k, v in CONFIGS["toy"].items() if not k.startswith("_")},
}


def _perturb(model, seed=0):
    """Add noise to every parameter: zero biases, unit norms, any zero-initialised layer all become
    random, so a wrong wiring anywhere changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _diffusers_model(kind, name, seed=0):
    torch.manual_seed(seed)
    if kind == "uncond":
        return _perturb(diffusers.UNet2DModel(**UNCOND[name]), seed)
    return _perturb(diffusers.UNet2DConditionModel(**COND[name]), seed)


def _inputs(cfg, batch=2, size=16, tokens=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], size, size, generator=g)
    dim = cfg.get("cross_attention_dim")
    cond = torch.randn(batch, tokens, dim, generator=g) if dim else None
    return x, cond


def _reference(dmodel, x, t, cond):
    with torch.no_grad():
        if cond is None:
            return dmodel(x, t).sample
        return dmodel(x, t, encoder_hidden_states=cond).sample


TIMESTEPS = [torch.tensor([999, 17]), 500, torch.tensor(250), torch.tensor([0.0, 723.4])]


@pytest.mark.parametrize("kind,name", [("uncond", n) for n in UNCOND] + [("cond", n) for n in COND])
def test_matches_diffusers_both_ways(kind, name, tmp_path):
    dmodel = _diffusers_model(kind, name)
    dmodel.save_pretrained(tmp_path / "diffusers")
    ours = UNet.from_pretrained(str(tmp_path / "diffusers"))
    assert ours.is_conditional == (kind == "cond")
    cfg = (UNCOND if kind == "uncond" else COND)[name]
    x, cond = _inputs(cfg)
    for t in TIMESTEPS:
        ref = _reference(dmodel, x, t, cond)
        with torch.no_grad():
            out = ours(x, t, cond)
        assert ref.std() > 0.05  # a real signal, not a vanishing one
        assert (out - ref).abs().max() <= 1e-4, (name, t)

    # Ours -> save_pretrained -> diffusers reads the same numbers back.
    ours.save_pretrained(str(tmp_path / "ours"))
    cls = diffusers.UNet2DModel if kind == "uncond" else diffusers.UNet2DConditionModel
    back = cls.from_pretrained(str(tmp_path / "ours")).eval()
    t = torch.tensor([3, 901])
    with torch.no_grad():
        assert (_reference(back, x, t, cond) - ours(x, t, cond)).abs().max() <= 1e-4


def test_odd_sizes_upsample_to_skip_size(tmp_path):
    """18 -> 9 -> 5 on the way down; diffusers then upsamples to the skips' sizes, and so do we."""
    dmodel = _diffusers_model("cond", "sd2_like")
    dmodel.save_pretrained(tmp_path)
    ours = UNet.from_pretrained(str(tmp_path))
    x, cond = _inputs(COND["sd2_like"], size=18)
    with torch.no_grad():
        assert (ours(x, 10, cond) - _reference(dmodel, x, 10, cond)).abs().max() <= 1e-4


def test_legacy_attention_names_load(tmp_path):
    """google/ddpm-cifar10-32 stores attention as query/key/value/proj_attn (pre-0.15 diffusers)."""
    dmodel = _diffusers_model("uncond", "ddpm_like")
    dmodel.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(path).items():
        for new, old in new_to_old.items():
            if "attentions" in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, path)
    ours = UNet.from_pretrained(str(tmp_path))
    x, _ = _inputs(UNCOND["ddpm_like"])
    with torch.no_grad():
        assert (ours(x, 42) - _reference(dmodel, x, 42, None)).abs().max() <= 1e-4


def test_from_pretrained_options(tmp_path):
    model = UNet.from_config_name("toy")
    model.save_pretrained(str(tmp_path / "unet"))
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with open(tmp_path / "unet" / "config.json") as f:
        saved = json.load(f)
    assert saved["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in saved
    loaded = UNet.from_pretrained(str(tmp_path), subfolder="unet", dtype=torch.bfloat16)
    assert not loaded.training
    assert loaded.config == model.config == json.loads(json.dumps(model.config))
    for (k, p), (k2, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert k == k2 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad
        assert torch.equal(p.to(torch.bfloat16), q)


def _one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_mismatched_weights_name_the_tensor(tmp_path):
    folder = tmp_path / "m"
    UNet.from_config_name("toy").save_pretrained(str(folder))
    weights = folder / "diffusion_pytorch_model.safetensors"
    config = folder / "config.json"
    good_config = config.read_text()

    # A wider first level in config.json: every tensor of that width is mis-shaped.
    config.write_text(json.dumps(dict(json.loads(good_config), block_out_channels=[48, 64, 64])))
    _one_line_error(ValueError, lambda: UNet.from_pretrained(str(folder)),
                    "do not match config.json", "tensor 'conv_in.weight' has shape (32, 3, 3, 3)", "more")

    # One more ResNet per block in config.json: tensors missing from the file.
    config.write_text(json.dumps(dict(json.loads(good_config), layers_per_block=2)))
    _one_line_error(ValueError, lambda: UNet.from_pretrained(str(folder)),
                    "missing tensor 'down_blocks.0.resnets.1.norm1.weight' (and ")
    config.write_text(good_config)

    # A tensor deleted from the file, and one added.
    state = load_file(weights)
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    _one_line_error(ValueError, lambda: UNet.from_pretrained(str(folder)),
                    "missing tensor 'conv_out.bias'", "unexpected tensor 'extra.weight'")


def test_missing_and_corrupt_files(tmp_path):
    _one_line_error(FileNotFoundError, lambda: UNet.from_pretrained(str(tmp_path / "nope")), "not found")
    folder = tmp_path / "m"
    folder.mkdir()
    _one_line_error(FileNotFoundError, lambda: UNet.from_pretrained(str(folder)), "config.json")
    (folder / "config.json").write_text("{not json")
    _one_line_error(ValueError, lambda: UNet.from_pretrained(str(folder)), "not valid JSON")
    (folder / "config.json").write_text(json.dumps(CONFIGS["toy"]))
    _one_line_error(FileNotFoundError, lambda: UNet.from_pretrained(str(folder)),
                    "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    _one_line_error(ValueError, lambda: UNet.from_pretrained(str(folder)), "pickle", "convert")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    _one_line_error(ValueError, lambda: UNet.from_pretrained(str(folder)), "corrupt")


def test_unsupported_config_values_are_named():
    base = dict(CONFIGS["toy"])
    for key, value in [("class_embed_type", "timestep"), ("addition_embed_type", "text"),
                       ("time_cond_proj_dim", 256), ("encoder_hid_dim", 32), ("num_attention_heads", 4),
                       ("only_cross_attention", True), ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"])]:
        _one_line_error(ValueError, lambda: UNet(dict(base, **{key: value})), key)
    _one_line_error(ValueError, lambda: UNet.from_config_name("sd21"), "sd15", "toy", "ddpm_cifar10")
    _one_line_error(ValueError, lambda: UNet.from_config_name("toy", widht=3), "widht")
    # Harmless bookkeeping keys of a diffusers config.json are accepted.
    UNet(dict(base, _diffusers_version="0.6.0", _name_or_path="x", dropout=0.0))


def test_cond_required_only_when_conditional():
    torch.manual_seed(0)
    toy = UNet.from_config_name("toy")
    x = torch.randn(2, 3, 16, 16)
    _one_line_error(ValueError, lambda: toy(x, 5), "cond")
    ddpm = UNet(dict(UNCOND["ddpm_like"], _class_name="UNet2DModel")).eval()
    with torch.no_grad():
        assert torch.equal(ddpm(x, 5), ddpm(x, 5, torch.randn(2, 1, 8)))  # ignored


def test_encode_features_and_shapes():
    torch.manual_seed(0)
    toy = UNet.from_config_name("toy").eval()
    x, cond = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 64)
    feats = toy.encode(x, torch.tensor([3, 700]), cond)
    c0, c1, c2 = CONFIGS["toy"]["block_out_channels"]
    assert [tuple(f.shape) for f in feats] == [(2, c0, 8, 8), (2, c1, 4, 4), (2, c2, 4, 4), (2, c2, 4, 4)]
    ddpm = UNet(dict(UNCOND["scale_shift"], _class_name="UNet2DModel"))
    feats = ddpm.encode(torch.randn(2, 4, 16, 16), 10)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4)]


# checkpointed pieces of one forward: "block": every down, mid and up block; "layer": every ResnetBlock2D (down 3 x 1,
# mid 2, up 3 x 2 in the toy; 2 x 1, 2, 2 x 2 in ddpm_like) and BasicTransformerBlock / AttnBlock (toy: 1 + 1 + 2;
# ddpm_like: 1 down, the mid one, 2 up)
CHECKPOINT_CALLS = {("toy", "block"): 3 + 1 + 3, ("toy", "layer"): 11 + 4,
                    ("ddpm_like", "block"): 2 + 1 + 2, ("ddpm_like", "layer"): 8 + 4}


@pytest.mark.parametrize("name", ["toy", "ddpm_like"])
@pytest.mark.parametrize("mode", ["block", True, "layer"])
def test_gradient_checkpointing_same_output_and_grads(monkeypatch, name, mode):
    torch.manual_seed(0)
    cfg = dict(CONFIGS["toy"]) if name == "toy" else dict(UNCOND[name], _class_name="UNet2DModel")
    model = _perturb(UNet(cfg)).train()
    x, cond, t = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 64), torch.tensor([10, 900])

    def run():
        model.zero_grad()
        out = model(x, t, cond)
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    assert model.gradient_checkpointing == "off"
    out_plain, grads_plain = run()
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda fn, *a, **k: calls.append(type(fn).__name__) or real(fn, *a, **k))
    model.gradient_checkpointing = mode
    out_ckpt, grads_ckpt = run()
    mode = "block" if mode is True else mode  # True: the per-block behaviour RunConfig.grad_ckpt asks for
    assert model.gradient_checkpointing == mode
    assert len(calls) == CHECKPOINT_CALLS[name, mode], calls
    pieces = {"DownBlock", "MidBlock", "UpBlock"} if mode == "block" else {"ResnetBlock2D", "BasicTransformerBlock"
                                                                          if name == "toy" else "AttnBlock"}
    assert set(calls) == pieces
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    for k in grads_plain:
        assert torch.allclose(grads_plain[k], grads_ckpt[k], atol=1e-6, rtol=1e-5), k
    with torch.no_grad():  # nothing to recompute without a backward: no checkpoint
        model(x, t, cond)
    model.eval()(x, t, cond)  # nor in eval mode
    assert len(calls) == CHECKPOINT_CALLS[name, mode]
    _one_line_error(ValueError, lambda: setattr(model, "gradient_checkpointing", "layers"), "block", "layer")


def test_checkpointing_memory_per_layer_below_per_block_below_none():
    """grad_ckpt.py's measurements on the toy, on CPU (real tensors) and on meta: the same bytes. Per block holds the
    least for the backward but rebuilds a whole block at once; per layer holds every layer's input and rebuilds one
    layer: its peak, measured op by op over forward + backward, is the lowest. held + rebuilt predicts that peak."""
    torch.manual_seed(0)
    model = UNet.from_config_name("toy").train()
    with torch.device("meta"):
        meta = UNet.from_config_name("toy").train()
    x, cond, t = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 64), torch.tensor([10, 900])
    got = {}
    for mode in ("off", "block", "layer"):
        model.gradient_checkpointing = meta.gradient_checkpointing = mode
        got[mode] = dict(grad_ckpt.activation_bytes(model, x, t, cond), measured=grad_ckpt.peak_bytes(model, x, t, cond))
        inputs = [v.to("meta") for v in (x, t, cond)]
        assert dict(grad_ckpt.activation_bytes(meta, *inputs), measured=grad_ckpt.peak_bytes(meta, *inputs)) == got[mode]
        assert got[mode]["peak"] <= got[mode]["measured"] < 1.1 * got[mode]["peak"], (mode, got[mode])
    assert got["off"]["rebuilt"] == 0
    assert got["layer"]["measured"] < got["block"]["measured"] < got["off"]["measured"] / 2
    assert got["block"]["held"] < got["layer"]["held"] < got["off"]["held"]
    assert got["layer"]["rebuilt"] < got["block"]["rebuilt"]


def test_meta_attention_saves_what_the_cpu_kernel_saves():
    """On meta SDPA would take its math kernel (saving the L x L attention matrix); grad_ckpt.py swaps in the CPU flash
    kernel there: the same output and the same saved tensors as F.scaled_dot_product_attention on CPU."""
    q, k, v = (torch.randn(2, 4, 64, 8, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
    saved = {}
    for name, fn in (("sdpa", torch.nn.functional.scaled_dot_product_attention), ("ours", grad_ckpt._sdpa_as_on_cpu)):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
            out = fn(q, k, v)
        saved[name] = (out.detach(), sorted(shapes))
    torch.testing.assert_close(saved["ours"][0], saved["sdpa"][0])
    assert saved["ours"][1] == saved["sdpa"][1] and (2, 4, 64, 64) not in saved["ours"][1]


@pytest.mark.parametrize("name,low,high", [("ddpm_cifar10", 35.7e6, 35.8e6), ("sd15", 855e6, 865e6)])
def test_full_size_parameter_counts(name, low, high):
    cfg = CONFIGS[name]
    cls = diffusers.UNet2DModel if cfg["_class_name"] == "UNet2DModel" else diffusers.UNet2DConditionModel
    with torch.device("meta"):  # shapes only: no memory, no init
        ours = UNet(cfg)
        ref = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert count_params(ours) == count_params(ref)
    assert low < count_params(ours) < high
    if name == "ddpm_cifar10":
        assert count_params(ours) == 35_746_307
