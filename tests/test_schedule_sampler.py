"""schedule.py and sampler.py: Eq. 1, 4, 5, 9 checked on a perfect teacher, against diffusers' schedulers, and the
students' samplers (first-step conditioning time first_t, re-noising, the training rollout) against a loop written out
here with a model that records the times it is told."""
import pytest
import torch

from gmm import GaussianMixture
from sampler import (ddim_step, eps_fn_for, guided_eps, linspace, sample, sample_dpmpp, student_sample,
                     student_timesteps, trailing, uniform)
from schedule import VPSchedule
from toyteacher import gen


@pytest.fixture(scope="module")
def mixture():
    means = 2.0 * torch.randn(4, 8, generator=gen(0), dtype=torch.float64)
    return GaussianMixture(means, std=0.3)


# --- schedule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_schedule_matches_diffusers(kind):
    from diffusers import DDPMScheduler
    ours = VPSchedule(kind)
    # diffusers' beta_start/beta_end default to DDPM's (1e-4, 0.02) whatever the kind: pass SD's explicitly
    theirs = DDPMScheduler(beta_schedule={"cosine": "squaredcos_cap_v2"}.get(kind, kind),
                           beta_start=ours.beta_start, beta_end=ours.beta_end)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    x = torch.zeros(5, 3, 2, 2)
    alpha, sigma = ours.alpha_sigma(torch.tensor([0, 1, 500, 998, 999]), x)
    assert alpha.shape == (5, 1, 1, 1) and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))


def test_terminal_alphas_as_method_md_states():
    # docs/method.md: ᾱ_T ≈ 4.0e-5 (DDPM linear), ≈ 4.7e-3 (SD scaled_linear); zero-terminal-SNR gives exactly 0
    assert abs(VPSchedule("linear").alphas_cumprod[-1].item() - 4.0e-5) < 0.1e-5
    assert abs(VPSchedule("scaled_linear").alphas_cumprod[-1].item() - 4.7e-3) < 0.1e-3
    z = VPSchedule("scaled_linear", zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0
    assert abs(z.alphas_cumprod[0].item() - VPSchedule("scaled_linear").alphas_cumprod[0].item()) < 1e-12
    from diffusers import DDPMScheduler
    torch.testing.assert_close(z.alphas_cumprod.float(),
                               DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             rescale_betas_zero_snr=True).alphas_cumprod,
                               rtol=1e-4, atol=1e-6)


def test_eq5_inverts_eq1_and_conversions_round_trip():
    sch = VPSchedule("linear")
    x0 = torch.randn(6, 3, 4, 4, generator=gen(1), dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=gen(2), dtype=torch.float64)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    x_t = sch.q_sample(x0, eps, t)  # Eq. 1
    torch.testing.assert_close(sch.x0_from_eps(x_t, eps, t), x0, rtol=0, atol=1e-8)  # Eq. 5 (1/α_999 ≈ 158)
    torch.testing.assert_close(sch.eps_from_x0(x_t, x0, t), eps, rtol=0, atol=1e-10)
    alpha, sigma = sch.alpha_sigma(t, x0)
    v = sch.v_from_eps(x0, eps, t)
    torch.testing.assert_close(alpha * x_t - sigma * v, x0)  # v-parameterisation identity
    # the data's dtype is kept, arithmetic is float64 underneath
    assert sch.q_sample(x0.float(), eps.float(), t).dtype == torch.float32


def test_schedule_config_round_trip(tmp_path):
    sch = VPSchedule("linear")
    sch.save_pretrained(tmp_path / "scheduler")
    back = VPSchedule.from_pretrained(str(tmp_path))
    assert back.kind == "linear" and torch.equal(back.alphas_cumprod, sch.alphas_cumprod)
    with pytest.raises(ValueError, match="ε-prediction"):
        VPSchedule.from_config({"beta_schedule": "linear", "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="unknown beta schedule"):
        VPSchedule("quadratic")


# --- timestep sets -----------------------------------------------------------------------------------
def test_timestep_sets():
    assert student_timesteps(3) == [999, 750, 500] and student_timesteps(2) == [999, 666] and student_timesteps(1) == [999]
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    for n in (1, 2, 3, 4, 10):
        s = DDIMScheduler(timestep_spacing="trailing")
        s.set_timesteps(n)
        assert trailing(n) == s.timesteps.tolist()
        d = DPMSolverMultistepScheduler(timestep_spacing="linspace")
        d.set_timesteps(n)
        assert linspace(n) == d.timesteps.tolist()
    assert uniform(999, 8)[0] == 999 and len(uniform(999, 8)) == 8 and uniform(999, 8)[-1] == 125
    assert uniform(200, 4) == [200, 150, 100, 50]


# --- DDIM on a perfect teacher -----------------------------------------------------------------------
def mixture_stats(mixture, x):
    """First and second moments, and how the samples fall onto the mixture's components."""
    k, _ = mixture.nearest(x)
    frac = torch.bincount(k, minlength=len(mixture.means)).double() / len(x)
    within = (x - mixture.means[k]).std().item()
    return (x.mean(0) - mixture.means.mean(0)).norm().item(), x.std(0).mean().item(), frac, within


def ddim_by_hand(eps_of, abar, x_T, timesteps, first_t=None, t_end=-1, noise_correction=False, renoise=None):
    """The students' samplers written out one step at a time, from ᾱ alone. At step i the network is told
    t_c = first_t if i = 0 and t = 999 (the step from pure noise), else t_c = t, and
        x̂_0 = (x − σ_{t_c} ε̂(x, t_c)) / α_{t_c}                                       (Eq. 5 at t_c)
        DDIM     x_next = α_next x̂_0 + σ_next ε_dir                                    (Eq. 4)
                 ε_dir = x_T at the first step from noise with noise correction (Eq. 9), else the noise x̂_0 leaves
                 in x at the TRUE t, (x − α_t x̂_0)/σ_t (= ε̂ whenever t_c = t)
        renoise  x_next = α_next x̂_0 + σ_next ε_fresh (a fresh draw from `renoise`, CPU)
    the last step going to t_end (−1: x̂_0). eps_of(x, t) takes a Python int t."""
    a, s = (lambda t: abar[t].sqrt()), (lambda t: (1 - abar[t]).sqrt())
    x = x_T
    for i, t in enumerate(timesteps):
        t_c = first_t if (first_t is not None and i == 0 and t == 999) else t
        x0 = (x - s(t_c) * eps_of(x, t_c)) / a(t_c)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else t_end
        if t_next < 0:
            return x0
        if renoise is not None:
            direction = torch.randn(x.shape, generator=renoise).to(x.dtype)
        elif noise_correction and i == 0 and t == 999:
            direction = x_T
        else:
            direction = (x - a(t) * x0) / s(t)
        x = a(t_next) * x0 + s(t_next) * direction
    return x


def test_many_step_ddim_reproduces_the_mixture_and_3_steps_do_not(mixture):
    sch = VPSchedule("linear")  # ᾱ_T ≈ 4e-5: x_T ~ N(0, I) is the true t = 999 marginal to 1e-2
    x0, _ = mixture.sample(4000, gen(3))
    x_T = torch.randn(4000, 8, generator=gen(4), dtype=torch.float64)
    eps_fn = lambda x, t: mixture.eps(sch, x, t)  # noqa: E731
    mean_err_data, std_data, _, _ = mixture_stats(mixture, x0)
    mean_err_250, std_250, frac_250, within_250 = mixture_stats(mixture, sample(eps_fn, sch, x_T, trailing(250)))
    mean_err_3, std_3, frac_3, within_3 = mixture_stats(mixture, sample(eps_fn, sch, x_T, trailing(3)))
    # 250 steps: mean, spread, the mixture's weights and each component's width, all as in data
    assert mean_err_250 < 0.25 and mean_err_data < 0.25  # (the mean of 4000 draws itself varies by ≈ 0.15)
    assert abs(std_250 - std_data) < 0.05
    assert (frac_250 - 0.25).abs().max() < 0.03
    assert abs(within_250 - mixture.std) < 0.03
    # 3 steps with the same perfect ε̂: the gap distillation closes (modes smeared, mis-weighted, shrunk)
    assert mean_err_3 > 0.4
    assert std_3 < std_data - 0.2
    assert (frac_3 - 0.25).abs().max() > 0.1
    assert within_3 > 1.3 * mixture.std


def test_ddim_step_is_eq4_and_ends_with_x0(mixture):
    sch = VPSchedule("scaled_linear")
    x = torch.randn(16, 8, generator=gen(5), dtype=torch.float64)
    eps = mixture.eps(sch, x, 750)
    x0_hat = sch.x0_from_eps(x, eps, 750)
    a, s = sch.alpha_sigma(500, x)
    torch.testing.assert_close(ddim_step(sch, x, eps, 750, 500), a * x0_hat + s * eps)
    torch.testing.assert_close(ddim_step(sch, x, eps, 750, -1), x0_hat)
    # the rollout form: stop at t_end instead of going to x̂_0; an empty list returns x_T unchanged
    fn = lambda x, t: mixture.eps(sch, x, t)  # noqa: E731
    by_hand = lambda ts, t_end=-1: ddim_by_hand(lambda x, t: mixture.eps(sch, x, t), sch.alphas_cumprod, x, ts,  # noqa: E731
                                                t_end=t_end)
    torch.testing.assert_close(sample(fn, sch, x, [999, 750], t_end=500), by_hand([999, 750], 500))
    torch.testing.assert_close(sample(fn, sch, x, [999, 750, 500]), by_hand([999, 750, 500]))
    assert sample(fn, sch, x, [], t_end=999) is x


# --- Eq. 9 noise correction --------------------------------------------------------------------------
def test_noise_correction_with_true_noise_changes_nothing():
    sch = VPSchedule("scaled_linear")
    x_T = torch.randn(16, 8, generator=gen(6), dtype=torch.float64)
    # an ε̂ that is exact where Eq. 9 assumes x_T = ε: ε̂(x_T, 999) = x_T, anything at later steps
    perfect = lambda x, t: x_T if t[0] == 999 else torch.tanh(x)  # noqa: E731
    plain = lambda x, t: x_T if t == 999 else torch.tanh(x)  # noqa: E731  (the same, told a Python int)
    for ts in ([999, 750, 500], [999, 666], [999]):
        ref = ddim_by_hand(plain, sch.alphas_cumprod, x_T, ts)  # plain DDIM, no correction
        for nc in (True, False):
            torch.testing.assert_close(sample(perfect, sch, x_T, ts, noise_correction=nc), ref, rtol=1e-12, atol=1e-12)


def test_noise_correction_removes_the_bias_term_exactly(mixture):
    sch = VPSchedule("scaled_linear")
    x_T = torch.randn(32, 8, generator=gen(7), dtype=torch.float64)
    bias = 0.3 * torch.randn(8, generator=gen(8), dtype=torch.float64)
    # a student whose ε̂ is biased at t = 999 only
    biased = lambda x, t: mixture.eps(sch, x, t) + (bias if t[0] == 999 else 0.0)  # noqa: E731
    eps_hat = biased(x_T, torch.full((32,), 999))
    _, sigma_next = sch.alpha_sigma(750, x_T)
    plain = sample(biased, sch, x_T, [999], t_end=750)
    corrected = sample(biased, sch, x_T, [999], t_end=750, noise_correction=True)
    # Eq. 9 vs Eq. 4: they differ by exactly σ_{t'} · (ε̂ − x_T) after the first step
    torch.testing.assert_close(plain - corrected, sigma_next * (eps_hat - x_T), rtol=0, atol=1e-12)
    # ... and only the first step differs: the rest of the trajectory is plain DDIM from the corrected point
    by_int = lambda x, t: mixture.eps(sch, x, t) + (bias if t == 999 else 0.0)  # noqa: E731
    full = sample(biased, sch, x_T, [999, 750, 500], noise_correction=True)
    torch.testing.assert_close(full, ddim_by_hand(by_int, sch.alphas_cumprod, x_T, [999, 750, 500], noise_correction=True),
                               rtol=1e-10, atol=1e-10)
    # a trajectory that does not start from pure noise (t ≠ 999) is not touched
    torch.testing.assert_close(sample(biased, sch, x_T, [750, 500], noise_correction=True),
                               ddim_by_hand(by_int, sch.alphas_cumprod, x_T, [750, 500]), rtol=1e-10, atol=1e-10)


# --- the first step's conditioning time (sampler.cond_time): what the demo trains and samples with ----------------
def told_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic ε̂ that depends on x and on the time it is told (so a wrong time changes the numbers)."""
    return torch.tanh(0.7 * x + 0.5) * (0.5 + t / 1000) + 0.1 * torch.sin(3 * x + t / 100)


class Recorder:
    """told_eps as a model, model(x_t, t, cond) or eps_fn(x_t, t): records the time it is told at every call."""

    def __init__(self):
        self.told = []

    def __call__(self, x, t, cond=None):
        assert t.shape == (x.shape[0],) and bool((t == t[0]).all())
        self.told.append(int(t[0]))
        return told_eps(x, int(t[0]))


@pytest.mark.parametrize("noise_correction", [False, True])
def test_sample_with_first_t_equals_the_loop_by_hand(noise_correction):
    sch = VPSchedule("scaled_linear")
    x_T = torch.randn(8, 6, generator=gen(14), dtype=torch.float64)
    for ts, t_end, first_t, told in [
        ([999, 750, 500, 250], -1, 666, [666, 750, 500, 250]),  # told 666 at the first step only
        ([999, 750, 500], 250, 666, [666, 750, 500]),  # the rollout form, stopping at x_250
        ([750, 500], -1, 666, [750, 500]),  # not from pure noise: first_t does not apply
        ([999, 750, 500], -1, None, [999, 750, 500]),  # the paper
        ([999, 750, 500], -1, 999, [999, 750, 500]),  # first_t = 999 is the paper too
    ]:
        rec = Recorder()
        x = sample(rec, sch, x_T, ts, noise_correction=noise_correction, t_end=t_end, first_t=first_t)
        assert rec.told == told, (ts, first_t)
        ref = ddim_by_hand(told_eps, sch.alphas_cumprod, x_T, ts, first_t, t_end, noise_correction)
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


def test_student_sample_follows_its_spec_with_first_t():
    """student_sample as an exported student's pipeline.json sets it: DDIM (noise correction on by default) or the
    re-noising sampler, the first n timesteps, first_t at the first step."""
    sch = VPSchedule("scaled_linear")
    x_T = torch.randn(8, 6, generator=gen(15), dtype=torch.float64)
    ts = [999, 750, 500, 250]
    rec = Recorder()
    x = student_sample(rec, sch, x_T, {"kind": "ddim", "timesteps": ts, "first_t": 666}, n=3)
    assert rec.told == [666, 750, 500]
    ref = ddim_by_hand(told_eps, sch.alphas_cumprod, x_T, ts[:3], 666, noise_correction=True)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    rec = Recorder()
    x = student_sample(rec, sch, x_T, {"kind": "renoise", "timesteps": ts, "first_t": 666}, generator=gen(16))
    assert rec.told == [666, 750, 500, 250]
    ref = ddim_by_hand(told_eps, sch.alphas_cumprod, x_T, ts, 666, renoise=gen(16))
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    rec = Recorder()  # one step: x̂_0 of x_T told first_t
    x = student_sample(rec, sch, x_T, {"kind": "renoise", "timesteps": [999], "first_t": 600})
    abar = sch.alphas_cumprod[600]
    assert rec.told == [600]
    torch.testing.assert_close(x, (x_T - (1 - abar).sqrt() * told_eps(x_T, 600)) / abar.sqrt(), rtol=1e-10, atol=1e-10)


def test_imagine_flash_backward_rollout_with_first_t():
    """Eq. 7's rollout during training is the inference sampler through the timesteps above t, told first_t at its
    first step from pure noise, with Eq. 9; at t = 999 there is nothing to roll out."""
    from methods.imagine_flash import backward_rollout
    sch = VPSchedule("scaled_linear")
    x_T = torch.randn(8, 6, generator=gen(17), dtype=torch.float64)
    for nc in (True, False):
        rec = Recorder()
        x = backward_rollout(rec, sch, x_T, None, 500, (999, 750, 500, 250), nc, first_t=666)
        assert rec.told == [666, 750]
        ref = ddim_by_hand(told_eps, sch.alphas_cumprod, x_T, [999, 750], 666, t_end=500, noise_correction=nc)
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    rec = Recorder()
    assert torch.equal(backward_rollout(rec, sch, x_T, None, 999, (999, 750, 500, 250), True, first_t=666), x_T)
    assert rec.told == []


# --- cross-checks against diffusers' schedulers -------------------------------------------------------
def smooth_eps(x, t):
    """A deterministic, nonlinear stand-in for a network: depends on x and t."""
    return torch.tanh(0.7 * x + 0.5) * (0.5 + t.float().view(-1, *[1] * (x.ndim - 1)) / 1000)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_ddim_equals_diffusers(kind):
    from diffusers import DDIMScheduler
    sch = VPSchedule(kind)
    x_T = torch.randn(4, 3, 8, 8, generator=gen(9))
    # diffusers steps t → t − T//n, so we compare where that is the next listed timestep (n = 2, 4, 10: trailing;
    # n = 4: leading, [750, 500, 250, 0]); its last step then lands below 0 and returns x̂_0 (set_alpha_to_one)
    for spacing, n in (("trailing", 2), ("trailing", 4), ("trailing", 10), ("leading", 4)):
        ref = DDIMScheduler(beta_schedule=kind, beta_start=sch.beta_start, beta_end=sch.beta_end, timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False)
        ref.set_timesteps(n)
        x = x_T.clone()
        for t in ref.timesteps:
            x = ref.step(smooth_eps(x, t.repeat(4)), t, x).prev_sample
        ours = sample(smooth_eps, sch, x_T, ref.timesteps.tolist())
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [25, 5])
def test_dpmpp_2m_equals_diffusers(n):
    from diffusers import DPMSolverMultistepScheduler
    sch = VPSchedule("scaled_linear")
    ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, algorithm_type="dpmsolver++", solver_order=2,
                                      final_sigmas_type="zero", timestep_spacing="linspace")
    ref.set_timesteps(n)
    x_T = torch.randn(4, 3, 8, 8, generator=gen(10))
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(smooth_eps(x, t.repeat(4)), t, x).prev_sample
    ours = sample_dpmpp(smooth_eps, sch, x_T, linspace(n))
    assert ref.timesteps.tolist() == linspace(n)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_dpmpp_25_steps_reproduces_the_mixture(mixture):
    sch = VPSchedule("linear")
    x_T = torch.randn(4000, 8, generator=gen(11), dtype=torch.float64)
    x = sample_dpmpp(lambda x, t: mixture.eps(sch, x, t), sch, x_T, linspace(25))
    _, _, frac, within = mixture_stats(mixture, x)
    assert (frac - 0.25).abs().max() < 0.03 and abs(within - mixture.std) < 0.05


# --- classifier-free guidance -------------------------------------------------------------------------
class CountingModel(torch.nn.Module):
    """A tiny conditional ε-model that counts its forwards and checks that rows are never mixed up."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        return self.lin(x) * cond.mean((1, 2))[:, None] + torch.sin(t.float())[:, None] * x


def test_cfg_batched_forward_equals_two_forwards():
    model = CountingModel()
    x = torch.randn(5, 4, generator=gen(12))
    t = torch.tensor([999, 750, 500, 3, 0])
    cond = torch.randn(5, 2, 6, generator=gen(13))
    null = torch.zeros(5, 2, 6)
    with torch.no_grad():
        batched = guided_eps(model, x, t, cond, null, scale=4.5)
        assert model.calls == 1  # one batched forward of [cond; uncond]
        e_c, e_u = model(x, t, cond), model(x, t, null)
    torch.testing.assert_close(batched, e_u + 4.5 * (e_c - e_u))
    model.calls = 0
    torch.testing.assert_close(eps_fn_for(model, cond, null, scale=1.0)(x, t), model(x, t, cond))
    assert model.calls == 2  # scale 1: no guidance, a single plain forward
