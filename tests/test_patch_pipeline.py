"""fastdiff.patch_pipeline / unpatch on a whole diffusers pipeline, and
fastdiff.nn.patch's coverage of AutoencoderKL.

Tolerances are derived from eager diffusers' own error against a float64 run
of the same model (same weights, same inputs, same latents): the patched
model's error against float64 may be at most ``FACTOR`` times eager's (plus a
floor of two ulps of the output scale, for the case where eager is
exact by chance). Nothing depends on this CPU's particular rounding.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import nn as fnn

diffusers = pytest.importorskip("diffusers")

FACTOR = 3.0  # ours vs float64 <= FACTOR x eager vs float64 (+ floor)
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_(module: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Perturb every parameter (GroupNorm weights/biases included, which diffusers initialises to 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def _bound(eager_err: float, ref: torch.Tensor, dtype: torch.dtype) -> float:
    floor = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
    return FACTOR * eager_err + floor


def _snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _assert_same_state(model, snap):
    sd = model.state_dict()
    assert list(sd) == list(snap)
    for k, v in sd.items():
        assert v.data_ptr() == snap[k][0], k
        assert torch.equal(v, snap[k][1]), k


def _structure(model):
    """Class of every module and of every attention processor, by name."""
    return {n: (type(m), type(getattr(m, "processor", None))) for n, m in model.named_modules()}


# -------------------------------------------------------------------- VAE ---
def _vae(**kw):
    """AutoencoderKL with the SD-1.5 block structure (4 levels, 2 resnets per encoder block, 3 per decoder
    block, a mid block with attention), scaled down."""
    torch.manual_seed(0)
    cfg = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               latent_channels=4, norm_num_groups=4, sample_size=16)
    cfg.update(kw)
    return _randomize_(diffusers.AutoencoderKL(**cfg), 0.1)


def test_patch_covers_every_autoencoder_kl_block():
    from diffusers.models.resnet import ResnetBlock2D
    vae = _vae()
    resnets = {n for n, m in vae.named_modules() if type(m) is ResnetBlock2D}
    attns = {n for n, m in vae.named_modules() if type(m).__name__ == "Attention"}
    assert len(resnets) == 4 * 2 + 2 + 4 * 3 + 2 and len(attns) == 2
    assert {n for n in resnets if vae.get_submodule(n).time_embedding_norm == "group"}  # the decoder's up blocks
    report = fnn.patch(vae)
    assert set(report.replaced["resnet_block"]) == resnets
    assert set(report.replaced["attention"]) == attns
    assert set(report.replaced["norm_out_silu"]) == {"encoder.conv_norm_out", "decoder.conv_norm_out"}
    assert set(report.replaced["upsample"]) == {f"decoder.up_blocks.{i}.upsamplers.0" for i in range(3)}
    assert "groupnorm" not in report.replaced  # no norm is left to run on its own
    assert report.skipped == {}
    # the fused blocks keep their norm/SiLU submodules (state dict, unpatch) but never call them
    calls = []
    for n, m in vae.named_modules():
        if type(m) in (nn.GroupNorm, nn.SiLU):
            m.register_forward_hook(lambda mod, i, o, n=n: calls.append(n))
    with torch.no_grad():
        vae(torch.randn(1, 3, 16, 16))
    assert calls == []


def _vae_run(vae, x, z):
    """Reconstruction (posterior mode) and a decode; loss = sum of squares; param grads."""
    vae.zero_grad()
    rec = vae(x, sample_posterior=False).sample
    dec = vae.decode(z).sample
    (rec.float().square().sum() + dec.float().square().sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad()
    return torch.cat([rec.detach().flatten(), dec.detach().flatten()]), grads


def _grad_err(g: dict, ref: dict) -> float:
    """Largest gradient error, relative to each tensor's own scale (max |ref|), that scale floored at 1e-3 of
    the largest gradient: some gradients are 0 in exact arithmetic (attention's key bias), so their low-precision
    values are pure rounding noise of the other terms."""
    assert g.keys() == ref.keys()
    top = max(v.abs().max().item() for v in ref.values())
    return max(_err(g[k], ref[k]) / max(ref[k].abs().max().item(), 1e-3 * top) for k in ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_vae_matches_eager_against_float64(dtype):
    stock = _vae()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    ref, g_ref = _vae_run(copy.deepcopy(stock).double(), x.double(), z.double())
    stock = stock.to(dtype)
    out_e, g_e = _vae_run(stock, x.to(dtype), z.to(dtype))
    patched = copy.deepcopy(stock)
    fnn.patch(patched)
    out_p, g_p = _vae_run(patched, x.to(dtype), z.to(dtype))
    e_eager, e_ours = _err(out_e, ref), _err(out_p, ref)
    assert e_ours <= _bound(e_eager, ref, dtype), (e_ours, e_eager)
    ge_eager, ge_ours = _grad_err(g_e, g_ref), _grad_err(g_p, g_ref)
    assert ge_ours <= FACTOR * ge_eager + 2 * torch.finfo(dtype).eps, (ge_ours, ge_eager)
    assert (g_p.keys() == g_e.keys()) and all(g_p[k].dtype == dtype for k in g_p)


def test_vae_group_resnet_ignores_temb_like_diffusers():
    from diffusers.models.resnet import ResnetBlock2D
    torch.manual_seed(4)
    b = _randomize_(ResnetBlock2D(in_channels=8, out_channels=4, temb_channels=None, groups=2,
                                  time_embedding_norm="group"), 0.2).eval()
    x, temb = torch.randn(2, 8, 5, 3), torch.randn(2, 6)
    ref, ref_t = b(x, None), b(x, temb)
    assert fnn.patch(b).counts == {"resnet_block": 1}
    torch.testing.assert_close(b(x, None), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b(x, temb), ref_t, rtol=1e-4, atol=1e-5)


def test_spatial_norm_resnets_are_skipped_with_a_reason():
    # MoVQ-style VQModel decoder: ResnetBlockCondNorm2D with SpatialNorm (never used by AutoencoderKL)
    torch.manual_seed(0)
    vq = diffusers.VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                           num_vq_embeddings=16, vq_embed_dim=4, norm_type="spatial", layers_per_block=1).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = vq(x).sample
    report = fnn.patch(vq)
    cond = [n for n, m in vq.named_modules() if type(m).__name__ == "ResnetBlockCondNorm2D"]
    assert cond and all("SpatialNorm" in report.skipped[n] for n in cond)
    assert report.replaced["resnet_block"]  # the encoder's plain resnets are still fused
    with torch.no_grad():
        torch.testing.assert_close(vq(x).sample, ref, rtol=1e-4, atol=1e-5)
    fnn.unpatch(vq)


# ---------------------------------------------------------------- pipeline ---
def _tokenizer(tmp_path):
    """A CLIP BPE tokenizer from a vocab written here: the 256 byte symbols (bare and word-final), the two
    special tokens and a few merges. No download."""
    transformers = pytest.importorskip("transformers")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = ["a t</w>", "c at</w>", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                     model_max_length=12)
    return tok, len(vocab)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tok, vocab_size = _tokenizer(tmp_path_factory.mktemp("clip_tok"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    _randomize_(unet, 0.05, 1), _randomize_(vae, 0.1, 2)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LATENTS = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))


def _images(pipe, dtype=torch.float32, steps=3):
    return pipe(["a cat", "dog"], num_inference_steps=steps, guidance_scale=4.0, height=16, width=16,
                output_type="pt", latents=LATENTS.expand(2, -1, -1, -1).to(dtype)).images


@pytest.fixture(scope="module")
def reference_images(sd_pipe):
    """(float32 eager images, float64 eager images) of the unpatched pipeline."""
    eager = _images(sd_pipe)
    p64 = copy.deepcopy(sd_pipe).to(torch.float64)
    return eager, _images(p64, torch.float64)


def test_patch_pipeline_images_equal_and_unpatch_restores(sd_pipe, reference_images):
    eager, ref = reference_images
    e_eager = _err(eager, ref)
    assert 0 < e_eager < 1e-3  # the images are not degenerate (and the float64 run is a real reference)
    models = {"unet": sd_pipe.unet, "vae": sd_pipe.vae, "text_encoder": sd_pipe.text_encoder}
    snaps = {k: _snapshot(m) for k, m in models.items()}
    structure = {k: _structure(m) for k, m in models.items()}
    old_sched, old_cfg = sd_pipe.scheduler, dict(sd_pipe.config)

    report = fastdiff.patch_pipeline(sd_pipe, scheduler=True)
    assert set(report.components) == {"unet", "vae"}
    assert "text_encoder" in report.skipped and "scheduler" not in report.skipped
    assert report.scheduler == "DDIMScheduler -> FusedDDIMScheduler"
    assert type(sd_pipe.scheduler).__name__ == "FusedDDIMScheduler"
    assert sd_pipe.scheduler.config.steps_offset == 1  # every config value carried over
    assert sd_pipe.config["scheduler"][1] == "FusedDDIMScheduler"
    vae_rep = report["vae"]
    assert vae_rep.skipped == {} and len(vae_rep.replaced["resnet_block"]) == 2 + 2 + 2 * 2 + 2
    assert report["unet"].counts["resnet_block"] and report["unet"].counts["attention"]
    for k, m in models.items():
        _assert_same_state(m, snaps[k])
    assert "FusedDDIMScheduler" in str(report)

    patched = _images(sd_pipe)
    e_ours = _err(patched, ref)
    assert e_ours <= _bound(e_eager, ref, torch.float32), (e_ours, e_eager)
    assert _err(patched, eager) <= (FACTOR + 1) * e_eager + 2 * torch.finfo(torch.float32).eps

    again = fastdiff.patch(sd_pipe)  # the same as patch_pipeline(scheduler=False): nothing new
    assert again.total == 0

    restored = fastdiff.unpatch(sd_pipe)
    assert restored.scheduler == "FusedDDIMScheduler -> DDIMScheduler"
    assert restored["vae"].total == vae_rep.total and restored["unet"].total == report["unet"].total
    assert sd_pipe.scheduler is old_sched and dict(sd_pipe.config) == old_cfg
    for k, m in models.items():
        assert _structure(m) == structure[k], k
        _assert_same_state(m, snaps[k])
    assert torch.equal(_images(sd_pipe), eager)
    assert fastdiff.unpatch_pipeline(sd_pipe).total == 0


def test_patch_pipeline_models_only_keeps_the_scheduler(sd_pipe, reference_images):
    eager, ref = reference_images
    sched = sd_pipe.scheduler
    report = fastdiff.nn.patch_pipeline(sd_pipe)
    try:
        assert report.scheduler is None and sd_pipe.scheduler is sched
        assert _err(_images(sd_pipe), ref) <= _bound(_err(eager, ref), ref, torch.float32)
    finally:
        fastdiff.unpatch(sd_pipe)
    assert sd_pipe.scheduler is sched


def test_scheduler_lookup_by_name(sd_pipe, monkeypatch):
    from fastdiff.diffusion import fused_scheduler_class
    assert fused_scheduler_class(diffusers.DDPMScheduler).__name__ == "FusedDDPMScheduler"
    assert fused_scheduler_class(diffusers.PNDMScheduler) is None
    assert fused_scheduler_class(fastdiff.FusedDDIMScheduler) is None  # already fused

    original = sd_pipe.scheduler
    sd_pipe.scheduler = diffusers.PNDMScheduler.from_config(original.config)
    pndm = sd_pipe.scheduler
    try:
        report = fastdiff.patch_pipeline(sd_pipe, scheduler=True)
        assert sd_pipe.scheduler is pndm and "FusedPNDMScheduler" in report.skipped["scheduler"]
        fastdiff.unpatch(sd_pipe)

        # a fused scheduler added to fastdiff.diffusion later is found by the same lookup
        class FusedPNDMScheduler(diffusers.PNDMScheduler):
            __module__ = "fastdiff.diffusion.fake"

        monkeypatch.setattr(fastdiff.diffusion, "FusedPNDMScheduler", FusedPNDMScheduler, raising=False)
        report = fastdiff.patch_pipeline(sd_pipe, scheduler=True)
        assert type(sd_pipe.scheduler) is FusedPNDMScheduler and report.scheduler.endswith("FusedPNDMScheduler")
        assert fastdiff.patch_pipeline(sd_pipe, scheduler=True).skipped["scheduler"].startswith("already")
        fastdiff.unpatch(sd_pipe)
        assert sd_pipe.scheduler is pndm

        # replaced by the user after patching: unpatch leaves the user's scheduler
        fastdiff.patch_pipeline(sd_pipe, scheduler=True)
        mine = diffusers.DDIMScheduler.from_config(original.config)
        sd_pipe.scheduler = mine
        assert "replaced" in fastdiff.unpatch(sd_pipe).skipped["scheduler"] and sd_pipe.scheduler is mine
    finally:
        sd_pipe.scheduler = original


def test_patch_pipeline_rejects_bad_input(sd_pipe):
    with pytest.raises(TypeError, match="pipe"):
        fastdiff.patch_pipeline(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pipe"):
        fastdiff.unpatch_pipeline(object())
    with pytest.raises(TypeError, match="scheduler"):
        fastdiff.patch_pipeline(sd_pipe, scheduler="yes")
    with pytest.raises(TypeError, match="model"):
        fastdiff.patch(object())


# ------------------------------------------------------------------- GPU ---
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_patch_pipeline_and_vae(sd_pipe, dtype):
    # the float64 reference runs on the CPU; eager and patched run on the GPU in `dtype`
    ref = _images(copy.deepcopy(sd_pipe).to(torch.float64), torch.float64)
    pipe = copy.deepcopy(sd_pipe).to("cuda", dtype)
    eager = _images(pipe, dtype).float().cpu()
    report = fastdiff.patch_pipeline(pipe, scheduler=True)
    assert report["vae"].skipped == {} and report.scheduler
    patched = _images(pipe, dtype).float().cpu()
    assert _err(patched, ref) <= _bound(_err(eager, ref), ref, dtype)
    fastdiff.unpatch(pipe)

    stock = _vae()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    out_ref, g_ref = _vae_run(copy.deepcopy(stock).double(), x.double(), z.double())
    stock = stock.to("cuda", dtype)
    out_e, g_e = _vae_run(stock, x.to("cuda", dtype), z.to("cuda", dtype))
    fnn.patch(stock)
    out_p, g_p = _vae_run(stock, x.to("cuda", dtype), z.to("cuda", dtype))
    assert _err(out_p.cpu(), out_ref) <= _bound(_err(out_e.cpu(), out_ref), out_ref, dtype)
    g_e = {k: v.cpu() for k, v in g_e.items()}
    g_p = {k: v.cpu() for k, v in g_p.items()}
    assert _grad_err(g_p, g_ref) <= FACTOR * _grad_err(g_e, g_ref) + 2 * torch.finfo(dtype).eps
