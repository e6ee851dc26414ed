"""
Distillation methods, one file each, all run by distill.py on the same teacher, sampler and evaluation.

Each file holds its Config (RunConfig + its own fields), PRESETS, its losses as functions returning per-sample
terms, and a Method class whose `train_step` is the whole iteration, top to bottom. Methods import the shared
modules (methods/common.py, sampler.py, schedule.py, discriminator.py, …), never each other.

  imagine_flash   backward distillation, SRL, noise correction, adversarial term (Kohler et al. 2024)
  dmd2            distribution matching with an online fake score, two time-scale updates, GAN head (Yin et al. 2024)
  emd             EM distillation: Langevin E-step on (ε, z) with noise cancellation (Xie et al. 2024)
  add             adversarial diffusion distillation: forward-noised data, discriminator + score distillation (Sauer et al. 2023)
  lcm             latent consistency distillation: skip-step CFG teacher solve, EMA target network (Luo et al. 2023)
  sid             score identity distillation, data-free, online fake score; SiDA's adversarial term (Zhou et al. 2024)
  sida            SiDA: sid with its adversarial term on real images, as its own entry (presets only) (Zhou et al. 2025)
"""
from methods import add, dmd2, emd, imagine_flash, lcm, sid, sida, step_distill

METHODS = {"imagine_flash": imagine_flash, "dmd2": dmd2, "emd": emd, "add": add, "step_distill": step_distill, "lcm": lcm, "sid": sid, "sida": sida}
