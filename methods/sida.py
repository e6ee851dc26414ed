"""
SiDA, Adversarial Score identity Distillation (Zhou et al., ICLR 2025): SiD with real images and a discriminator
that is the fake score's own encoder. Its own entry so that compare.py and distill.py --method sida put it beside
SiD; the losses, the discriminator and the iteration are all methods/sid.py's (`adv_g_loss`, `adv_d_loss`,
`d_weight`, `SiD.train_step`), read there. This file holds SiDA's defaults and presets, and why they are what they are.

The reference (the authors' SiDA training loop) weights θ's two terms ½ SiD + ½ adversarial, the adversarial term
scaled by the pixel count D so that it stands beside SiD's loss summed over pixels. Here SiD's loss is the pixel
mean, so --adv-weight 1 is that same balance (the overall factor D/2 is one Adam does not see). It turns the term on
after 200k images (6250 iterations at batch 32, --adv-start); the toy's 6 minutes are about 300.

    python distill.py --method sida --preset toy --teacher runs/demo/teacher
"""
from dataclasses import asdict, dataclass

import cli
from cli import arg
from methods import sid
from methods.sid import SiD as Method  # noqa: F401 (the iteration: SiD's, with its adversarial branch on)


@dataclass
class Config(sid.Config):
    adv_weight: float = arg(1.0, "weight of θ's adversarial term (1: the reference's ½ SiD + ½ adversarial, up to a "
                                 "factor Adam ignores); SiDA needs it > 0 (0 is --method sid)")


PRESETS = {
    # CPU, the demo's toy teacher: SiD's toy preset (methods/sid.py) with the adversarial term on. Its weight, from a
    # sweep (docs/recipes.md, SiD / SiDA; seed 0, 6 minutes, ~290 iterations): 1 (the reference's balance) made the
    # 1-step student noise (18.8); 0.1 and 0.01 gave 0.97 and 0.91 against SiD's 1.01 ± 0.09: no gain, no harm, at a
    # budget where D has barely begun to tell real from generated. 0.1: the largest weight that did not hurt.
    "toy": Config(**{**asdict(sid.PRESETS["toy"]), "adv_weight": 0.1, "out": "runs/demo/sida"}),
}


def validate(cfg: Config) -> None:
    """SiD's checks, and SiDA's one: the adversarial term is on."""
    sid.validate(cfg)
    cli.require([(cfg.adv_weight > 0, f"--adv-weight must be > 0 for SiDA (got {cfg.adv_weight}; 0 is --method sid)")])


unused = sid.unused
