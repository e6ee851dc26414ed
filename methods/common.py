"""
What every distillation method shares (a shared module: methods import it, never each other).

  RunConfig     the run's fields: teacher, data, batch, optimiser, the student's timesteps, checkpoints, devices.
                A method's Config adds its own fields and presets.
  Distiller     builds the frozen teacher, the student (an exact copy of the teacher), its EMA, the data and the
                student's optimiser; gives each micro-batch its conditions and real images; updates the student
                (clip, Adam, EMA); samples a fixed grid with the student's own sampler. A method subclasses it,
                builds its extra networks in `build_extra` (each trainable one through `self.wrap`, then its
                optimiser) and writes `train_step` (each micro-batch's backward under `self.accumulate(net, m)`).
                Under torchrun `wrap` is DDP, or FSDP2 with --fsdp (sharding.py: the EMA sharded alike).
  student_x0    Eq. 5 with the student's ε̂, with gradient, at the time the student is told (first_t).
  draw_timestep the training timestep of an iteration, the same on every rank.
  fake_score_loss, dm_gradient, dm_surrogate   distribution matching (DMD2, EMD): the online fake score's ε-loss,
                the normalised score-difference gradient and the surrogate loss that applies it.
"""
import copy
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

import cli
import processes
import sharding
from cli import arg
from data import Source
from pipeline import encode_prompts, load_pipeline
from sampler import cond_time, eps_fn_for, guided_eps, student_sample
from schedule import VPSchedule


@dataclass
class RunConfig:
    teacher: str = arg("runs/demo/teacher", "pipeline folder (train.py output, diffusers folder) or hub id")
    data: str = arg("toy", "toy | cifar10:<root> | image–caption folder | prompts .txt (no real images)")
    latent_cache: str = arg("", "safetensors file of the caption folder's VAE latents (encoded once, then reused)")
    out: str = arg("runs/demo/distill", "output folder (student/, state.safetensors, samples/, log.jsonl)")
    steps: int = arg(600, "training iterations")
    time_budget: float = arg(0.0, "minutes of distillation wall time, then stop, checkpoint and export (0: no limit; "
                                  "compare.py gives every method the same)")
    export_at: str = arg("", "wall-time minutes, comma-separated and ascending (e.g. 1,2,4,6), at which the EMA "
                             "student is also exported to <out>/at/<m>min/ (compare.py's curves; '': none)")
    global_batch: int = arg(64, "samples per iteration over all processes")
    micro_batch: int = arg(64, "samples per forward per process")
    lr: float = arg(5e-6, "student learning rate")
    adam_betas: tuple = arg((0.9, 0.999), "Adam betas")
    weight_decay: float = arg(0.0, "AdamW's decoupled weight decay of every trainable network (0: plain Adam; "
                                   "DMD2's trainer: 0.01)")
    grad_clip: float = arg(0.0, "clip the student's gradient (and DMD2's fake score's) to this global norm (0: off; "
                                 "the norm is logged anyway)")
    timesteps: tuple = arg((999, 750, 500), "the student's inference timesteps; n steps = the first n")
    first_t: int = arg(999, "the time the student is TOLD at its first step from pure noise (999: the paper; "
                            "less: a deviation, see sampler.cond_time)")
    ema_decay: float = arg(0.99, "EMA decay of the exported student")
    seed: int = arg(0, "random seed")
    toy_size: int = arg(16, "toy image size")
    toy_images: int = arg(20000, "toy dataset size")
    log_every: int = arg(25, "log line every N steps")
    sample_every: int = arg(0, "sample grid every N steps (0: only at the end)")
    ckpt_every: int = arg(200, "checkpoint every N steps")
    resume: str = arg("", "checkpoint to resume, or 'auto' (<out>/state.safetensors if it exists)")
    overwrite: bool = arg(False, "replace the run already in --out (its checkpoint and log are removed)")
    device: str = arg("auto", "auto | cpu | cuda")
    bf16: bool = arg(False, "bf16 autocast (CUDA) and bf16 frozen networks")
    grad_ckpt: str = arg("off", "gradient checkpointing in the trainable networks: off | block (each U-Net block recomputed in the backward) | layer (each ResNet and transformer layer: the same recompute, less memory; docs/grad_ckpt.md)")
    compile: bool = arg(False, "torch.compile the teacher U-Net")
    threads: int = arg(0, "torch threads per process (0: fit the machine: OMP_NUM_THREADS, else the CPUs less the load "
                          "of other work; docs/threads.md)")
    dist_timeout: float = arg(30.0, "minutes a process waits in a collective (torchrun) before the run fails instead of "
                                    "hanging; rank 0 alone writes checkpoints and the export meanwhile")
    fsdp: bool = arg(False, "FSDP2 under torchrun: shard the trainable networks, their EMA and Adam moments over the "
                            "processes instead of a full copy each (DDP); the same math and checkpoint; one process: "
                            "no-op")


def student_x0(student, schedule: VPSchedule, x_t: torch.Tensor, t: int, cond, first_t: int | None = None) -> torch.Tensor:
    # Eq. 5 with the student's ε̂, with gradient: x̂_0^Θ = (x_t − σ_{t_c} ε̂_Θ(x_t, t_c, c)) / α_{t_c},
    # t_c = t except at the first step from pure noise when first_t says otherwise (sampler.cond_time)
    t_c = cond_time(t, schedule, first_t)
    t_vec = torch.full((x_t.shape[0],), t_c, device=x_t.device, dtype=torch.long)
    return schedule.x0_from_eps(x_t, student(x_t, t_vec, cond), t_c)


def draw_timestep(timesteps: tuple, seed: int, step: int) -> int:
    """The training t for this iteration, uniform over the student's timesteps. The generator depends only
    on (seed, step), so every DDP rank draws the same t (equal work per rank) and resume is exact."""
    g = processes.rank_generator(seed, step, stream=7)
    return int(timesteps[torch.randint(len(timesteps), (1,), generator=g).item()])


def validate_run(cfg: RunConfig) -> None:
    """The fields every method shares, before anything is loaded or written: one ValueError line."""
    cli.validate_common(cfg)
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ValueError(f"--adam-betas must be two numbers in [0, 1), got {cfg.adam_betas}")
    if cfg.grad_clip < 0 or cfg.sample_every < 0:
        raise ValueError("--grad-clip and --sample-every must be ≥ 0 (0: off / at the end)")
    if list(cfg.timesteps) != sorted(set(cfg.timesteps), reverse=True) or not 0 <= min(cfg.timesteps) <= max(cfg.timesteps) < 1000:
        raise ValueError(f"--timesteps must be distinct, descending, in [0, 999]; got {cfg.timesteps}")
    if not 0 <= cfg.first_t < 1000:
        raise ValueError(f"--first-t must be in [0, 999]; got {cfg.first_t}")
    if cfg.grad_ckpt not in ("off", "block", "layer"):
        raise ValueError(f"--grad-ckpt must be off, block or layer; got {cfg.grad_ckpt!r}")


class Distiller:
    """Teacher, student, EMA, data and the student's optimiser from a RunConfig; a method adds the rest."""

    lr_of = {"opt_g": "lr"}  # optimiser → its learning-rate field (a resumed run applies the new values)

    def __init__(self, cfg: RunConfig, dist: processes.Dist):
        self.cfg, self.dist = cfg, dist
        validate_run(cfg)
        self.accum = processes.batch_plan(cfg.global_batch, cfg.micro_batch, dist.world)
        device = dist.device
        # --fsdp shards over the processes of a torchrun; one process has nothing to shard with, so it runs as without
        self.fsdp = cfg.fsdp and dist.world > 1
        if cfg.fsdp and dist.world == 1:
            processes.print0("--fsdp: one process, nothing to shard: the networks stay whole (FSDP2 needs torchrun)")

        pipe = load_pipeline(cfg.teacher)
        self.pipe, self.schedule = pipe, pipe.schedule
        # the frozen teacher: eval, no grad, never wrapped in DDP nor sharded; bf16 at scale
        self.teacher = pipe.unet.to(device).eval().requires_grad_(False)
        if pipe.encoder is not None:
            pipe.encoder.to(device)
        pipe.autoencoder.to(device)
        # the student starts as an exact copy of the teacher (fp32 master weights)
        self.student = copy.deepcopy(self.teacher).float().train().requires_grad_(True)
        self.student.gradient_checkpointing = cfg.grad_ckpt
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)

        self.latent_shape = pipe.latent_shape()
        image_size = self.latent_shape[-1] * pipe.autoencoder.downscale  # the teacher's pixel resolution
        self.source = Source(cfg.data, toy_images=cfg.toy_images, toy_size=cfg.toy_size, seed=cfg.seed, size=image_size)
        labels = getattr(pipe.encoder, "config", lambda: {})().get("kind") == "labels"  # the toy's label encoder
        if labels != (cfg.data == "toy") and pipe.encoder is not None:  # prompts of a kind the teacher cannot read
            raise ValueError(f"teacher {cfg.teacher} is conditioned on {'class labels' if labels else 'text'}, but --data "
                             f"{cfg.data} gives {'class labels' if cfg.data == 'toy' else 'captions or prompts'}: "
                             f"{'use --data toy' if labels else 'use an image–caption folder or a prompts file'}, or "
                             "another teacher")
        if self.needs_images() and not self.source.has_images:
            raise ValueError(f"{cfg.data} has prompts only: this configuration needs real images "
                             "(use --disc none, or an image–caption folder)")
        if cfg.latent_cache:  # the VAE runs over the caption folder once; get() then returns latents
            self.source.use_latents(cfg.latent_cache, pipe.autoencoder, dist, cfg.micro_batch)
        self.build_extra()  # the method's own networks, from the fp32 teacher

        # at scale the frozen networks (teacher, VAE, text encoder) run in bf16: half the memory and bandwidth.
        # Cast last: the latent cache is fingerprinted and the method's copies made from fp32 weights. What the
        # frozen networks produce is cast back to fp32 where trainable networks read it.
        self.frozen_dtype = torch.bfloat16 if (cfg.bf16 and device.type == "cuda") else torch.float32
        for frozen in (self.teacher, pipe.autoencoder, pipe.encoder):
            if frozen is not None:
                frozen.to(self.frozen_dtype)

        # only the trainable networks are wrapped for gradient averaging across ranks; the optimiser after it
        # (FSDP2 replaces the parameters by their shards)
        self.student_ddp = self.wrap(self.student)
        self.opt_g = self.adam(self.student.parameters(), cfg.lr)
        if self.fsdp:
            self.shard_followers()
        self.teacher_fn = torch.compile(self.teacher) if cfg.compile else self.teacher
        self.step = 0

    # --- what a method overrides --------------------------------------------------------------------
    def needs_images(self) -> bool:
        return False

    def build_extra(self) -> None:
        """Build the method's extra networks and optimisers (discriminator, fake score, …)."""

    def sampler_spec(self) -> dict:
        """How this student samples (written to its pipeline.json; evaluate.py and the rollout read it)."""
        return {"kind": "ddim", "timesteps": list(self.cfg.timesteps), "noise_correction": True,
                "first_t": self.cfg.first_t}

    def state(self) -> tuple[dict, dict]:
        """The modules and optimisers that make up a checkpoint."""
        return {"student": self.student, "ema": self.ema}, {"opt_g": self.opt_g}

    # --- shared machinery ---------------------------------------------------------------------------
    def wrap(self, module):
        """A trainable network for training across ranks: sharded in place (--fsdp, FSDP2), or in DDP (gradients in
        the buckets themselves: no second fp32 copy of them), or itself (one process). Build its optimiser after."""
        if self.fsdp:
            return sharding.shard(module, self.dist.device, bf16=self.cfg.bf16 and self.dist.device.type == "cuda")
        return DDP(module, gradient_as_bucket_view=True) if self.dist.world > 1 else module

    def shard_followers(self) -> None:
        """Under FSDP2, the networks of the checkpoint that only follow the trainable ones (the EMA, LCM's target, a
        round's teacher: updated from the student, never by a gradient) are sharded the same way, so their
        parameters are the same rows as the student's on every rank and the EMA's lerp is on local shards. Then
        every optimiser must hold shards: one built before its network was sharded would update stale tensors."""
        modules, optimizers = self.state()
        for module in modules.values():
            if not sharding.is_sharded(module):
                self.wrap(module)
        for name, opt in optimizers.items():
            if opt is not None and not all(sharding.is_sharded(p) for g in opt.param_groups for p in g["params"]):
                raise RuntimeError(f"{name} holds parameters that are not shards: build it after self.wrap(network)")

    def micro_slices(self):
        """(micro index, slice of the global batch) for this rank."""
        b = self.cfg.micro_batch
        for m in range(self.accum):
            start = (m * self.dist.world + self.dist.rank) * b
            yield m, slice(start, start + b)

    def sync(self, m: int) -> bool:
        """Average gradients across ranks on the last micro-batch only (no_sync before it)."""
        return m == self.accum - 1 or self.dist.world == 1

    def accumulate(self, net, m: int):
        """The context of micro-batch m's forward and backward through `net` (a wrapped network): its gradients are
        averaged across ranks after the last micro-batch only, and accumulate locally before it. DDP: no_sync();
        FSDP2: set_requires_gradient_sync(False) (the gradients stay whole and unreduced until the last one's
        reduce-scatter)."""
        if self.fsdp:
            net.set_requires_gradient_sync(self.sync(m))
            return torch.enable_grad()
        return torch.enable_grad() if self.sync(m) else net.no_sync()

    def decode(self, z):
        return self.pipe.autoencoder.decode(z.to(self.frozen_dtype)).float()  # identity in pixel space

    @torch.no_grad()
    def conditions(self, idx: torch.Tensor, need_images: bool = True):
        """(c, c_∅, x0_real) for the data indices of one micro-batch: the prompts' embeddings (shared by every
        network) and the real images in the diffusion space (cached latents, or encoded now), or None.
        need_images=False: the prompts alone; no image is read or decoded. Each rank asks for its own micro-batches
        only, so it reads only their images."""
        images, prompts = self.source.get(idx.cpu(), images=need_images)
        cond, null_cond = encode_prompts(self.pipe.encoder, prompts, self.dist.device)
        if cond is not None:
            cond, null_cond = cond.float(), null_cond.float()
        x0_real = None
        if images is not None:
            x0_real = images.to(self.dist.device) if self.source.encoded else \
                self.pipe.autoencoder.encode(images.to(self.dist.device, self.frozen_dtype)).float()
        return cond, null_cond, x0_real

    def adam(self, params, lr: float) -> torch.optim.Optimizer:
        """Every trainable network's optimiser: AdamW with the run's betas and weight decay (0: exactly Adam)."""
        return torch.optim.AdamW(params, lr=lr, betas=tuple(self.cfg.adam_betas), weight_decay=self.cfg.weight_decay)

    def clip(self, module) -> float:
        """Clip `module`'s gradient to cfg.grad_clip's global norm (0: no clipping); returns the norm before it.
        FSDP2: the global norm over every rank's shards (a DTensor, the same on every rank), clipped shard by shard."""
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return sharding.gather(torch.nn.utils.clip_grad_norm_(module.parameters(), limit)).item()

    def update_student(self) -> float:
        """Clip (when cfg.grad_clip > 0), Adam, EMA. Returns the global gradient norm (after DDP's averaging)."""
        norm = self.clip(self.student)
        with record_function("adam_student"):  # phase labels: bench.py reads them from a torch.profiler run
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
        with record_function("ema"):
            processes.update_ema(self.ema, self.student, self.cfg.ema_decay)
        return norm

    def full_ema(self):
        """The EMA student whole, on the main rank (None on the others): itself, or under FSDP2 its shards gathered
        (a collective: every rank calls this) into a plain copy of the architecture, for the grid and the export."""
        if not self.fsdp:
            return self.ema if self.dist.main else None
        weights = sharding.full_state_dict(self.ema, self.dist.main)  # one all-gather per tensor, on every rank
        if not self.dist.main:
            return None
        net = copy.deepcopy(self.teacher).float().eval()  # the same architecture, whole (the teacher is never sharded)
        net.load_state_dict(weights)
        return net

    @torch.no_grad()
    def samples(self, n: int = 12) -> torch.Tensor | None:
        """A fixed grid from the EMA student with its own sampler: same seeds and prompts every time. Every rank calls
        it (FSDP2 gathers the EMA); the main rank returns the grid, the others None."""
        ema = self.full_ema()
        if ema is None:
            return None
        g = torch.Generator().manual_seed(1234)
        x_T = torch.randn(n, *self.latent_shape, generator=g).to(self.dist.device)
        if self.source.prompts is not None:  # toy: one sample per class
            prompts = torch.arange(n) % int(self.source.prompts.max() + 1)
        elif self.pipe.encoder is not None:  # the first n captions of the data
            prompts = self.source.get(torch.arange(n) % self.source.n, images=False)[1]
        else:
            prompts = None
        cond, _ = encode_prompts(self.pipe.encoder, prompts, self.dist.device)
        cond = cond.float() if cond is not None else None
        x = student_sample(eps_fn_for(ema, cond), self.schedule, x_T, self.sampler_spec(), generator=g)
        return self.decode(x).clamp(-1, 1)


# --------------------------------------------------------------------------------------------------
# distribution matching (shared by dmd2 and emd)
# --------------------------------------------------------------------------------------------------
def fake_score_loss(fake, schedule: VPSchedule, x0_fake: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    cond) -> torch.Tensor:
    # the fake score's denoising loss (DMD2 Eq. 6 / the standard ε-loss) on generator samples:
    # ‖ε̂_φ(q(sg(x̂_0^θ), ε, t), t, c) − ε‖², mean over pixels, one value per sample (B,). t: (B,) timesteps.
    x0_fake = x0_fake.detach()  # stop-gradient: the fake score's step never reaches the generator
    x_t = schedule.q_sample(x0_fake, eps, t)  # Eq. 1
    return (fake(x_t, t, cond).float() - eps).pow(2).flatten(1).mean(1)


@torch.no_grad()
def dm_gradient(teacher, fake, schedule: VPSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond,
                null_cond, cfg_scale: float) -> torch.Tensor:
    """The distribution-matching gradient (DMD Eq. 7 with DMD2's normalisation), no graph: at x_t = q(sg(x̂_0), ε, t)
        g = (x̂_0^fake − x̂_0^real) / mean_pixels |x̂_0 − x̂_0^real|        (per sample)
    real = the frozen teacher with CFG (cfg_scale), fake = φ without guidance. −g points from the fake toward
    the real distribution: a step x̂_0 − g moves the generator's samples toward the teacher's."""
    x0 = x0.detach().float()  # stop-gradient: both scores are read at sg(x̂_0^θ)
    x_t = schedule.q_sample(x0, eps, t)  # Eq. 1
    x0_real = schedule.x0_from_eps(x_t, guided_eps(teacher, x_t, t, cond, null_cond, cfg_scale).float(), t)  # Eq. 5
    x0_fake = schedule.x0_from_eps(x_t, fake(x_t, t, cond).float(), t)  # Eq. 5
    norm = (x0 - x0_real).abs().flatten(1).mean(1)  # DMD's per-sample normaliser, (B,)
    return torch.nan_to_num((x0_fake - x0_real) / norm.view(-1, *[1] * (x0.ndim - 1)))


def dm_surrogate(x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # the surrogate whose gradient w.r.t. x̂_0 is g: ½‖x̂_0^θ − sg(x̂_0^θ − g)‖², mean over pixels (DMD2's
    # reduction, ‖·‖²/D), one value per sample (B,). d/dx̂_0 = g/D; the value itself is ½ mean(g²).
    target = (x0 - g).detach()  # stop-gradient: the target carries no graph
    return 0.5 * (x0 - target).pow(2).flatten(1).mean(1)
