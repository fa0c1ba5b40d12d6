"""Latent consistency distillation (chapter 15, `python -m minisd train lcm`), at tiny sizes."""
import torch

from minisd import train
from minisd.schedulers import DDIM, LCM, SchedulerConfig
from minisd.train import lcm
from minisd.unet import UNet, UNetConfig

D = 16


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(UNetConfig(block_channels=(16, 32), cross_attention=(True, True), heads=(2, 2),
                           layers_per_block=1, context_dim=D, groups=8, sample_size=8)).eval()


def test_boundary_condition_and_the_samplers_formula():
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = lcm.boundary(t)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)           # f(x, 0) = x
    sampler = LCM()
    for i, ti in enumerate(t):
        s, o = sampler.boundary(ti)
        torch.testing.assert_close((s, o), (c_skip[i], c_out[i]))     # the trainer and the sampler agree
    assert torch.all(c_skip[1:] < 1e-5)                                # elsewhere f is the U-Net's x0 guess


def test_consistency_function_is_the_identity_at_zero():
    unet = tiny_unet()
    abar = SchedulerConfig.sd15().alphas_cumprod(False)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(lcm.consistency(unet, x, torch.tensor([0, 0]), c, abar), x)
        assert not torch.allclose(lcm.consistency(unet, x, torch.tensor([499, 499]), c, abar), x)


def test_solver_step_is_ddims_step():
    """The distillation's solver t -> t - 20 is the DDIM sampler's step on the 50-point 'trailing' schedule
    (999, 979, ..., 19), down to t = 19 -> abar_0 (set_alpha_to_one=False)."""
    config = SchedulerConfig(**{**vars(SchedulerConfig.sd15()), "timestep_spacing": "trailing"})
    ddim = DDIM(config)
    ddim.set_timesteps(50)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 19
    abar = config.alphas_cumprod(False)
    g = torch.Generator().manual_seed(0)
    for t in (999, 519, 19):
        x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        want = ddim.step(eps, t, x)
        got = lcm.ddim_solver_step(x, eps, abar[t], abar[max(t - lcm.SKIP, 0)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_distill_moves_the_student_not_the_teacher():
    teacher = tiny_unet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    contexts, prompts = torch.randn(4, 7, D, generator=g), ["a", "b", "c", ""]
    student, target, log = train.distill_lcm(teacher, latents, labels, contexts, prompts, guidance=3.0, steps=4,
                                             batch_size=4, lr=1e-3, progress=False)
    assert len(log["loss"]) == 4 and all(torch.isfinite(torch.tensor(log["loss"])))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())        # frozen teacher
    s, tg, tc = (dict(m.named_parameters()) for m in (student, target, teacher))
    name = "conv_in.weight"
    assert not torch.equal(s[name], tc[name]) and not torch.equal(tg[name], tc[name])
    # the target is an EMA (decay 0.95) of the student: it moved, but less
    assert (tg[name] - tc[name]).norm() < (s[name] - tc[name]).norm()
    assert not any(p.requires_grad for p in target.parameters())


def test_cli_is_registered():
    assert train.TRAINERS["lcm"] is lcm.cli_lcm


def test_held_out_fid_is_chapter_12s_fid_on_the_eval_captions():
    import numpy as np
    from types import SimpleNamespace
    from minisd import data, metrics
    from minisd.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()                       # f = 2: 8x8 latents -> 16x16 images
    prompts = train.course_prompts()
    contexts = torch.randn(len(prompts), 77, D)
    pooled = SimpleNamespace(image=lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))  # (N, 12)
    sampling = {"sampler": "ddim", "steps": 2, "guidance": 1.5}
    assert lcm.fid_seeds() == tuple(range(9100, 9145))                 # 45 x 9 = 405 >= 400, the eval's seeds first
    out = lcm.held_out_fid(tiny_unet(1), tiny_unet(0), vae, contexts, prompts, sampling, pooled, n=20,
                           progress=False)
    assert out["n"] == 20 and "9100-9102" in out["captions"]
    assert out["teacher"]["steps"] == 2 and out["lcm_4"]["sampler"] == "lcm" and out["lcm_4"]["guidance"] == 1.0
    for v in (out["real_vs_real_floor"], out["lcm_4"]["fid"], out["teacher"]["fid"], out["chapter12_floor"]):
        assert np.isfinite(v) and v >= 0
    assert out["lcm_4_vs_teacher"] == out["lcm_4"]["fid"] / out["teacher"]["fid"]
    # the floor is chapter 12's pair: the captions drawn with one rng(100) and again with one rng(101)
    captions = ([data.caption(*c) for c in data.HELD_OUT] * 3)[:20]
    rng_draw = {s: np.random.default_rng(s) for s in (100, 101)}
    real, twin = (np.stack([data.render(*data.parse(c), rng=rng_draw[s]) for c in captions]) for s in (100, 101))
    assert out["real_vs_real_floor"] == metrics.frechet_distance(lcm.course_fid_features(pooled, real),
                                                                 lcm.course_fid_features(pooled, twin))
