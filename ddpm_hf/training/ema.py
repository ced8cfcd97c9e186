"""The exponential moving average of the UNet's weights, and swapping it in while sampling."""

import contextlib

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel


class PlainEMA(EMAModel):
    """diffusers' EMAModel with the original's rule by default: the same decay from the first update
    (the stock class uses decay 0, a plain copy, on its first step). With use_ema_warmup (--ema_warmup)
    the stock warm-up rule instead."""

    def get_decay(self, optimization_step: int) -> float:
        return super().get_decay(optimization_step) if self.use_ema_warmup else self.decay

    @torch.no_grad()
    def step(self, parameters) -> None:
        """shadow += (1 - decay) * (param - shadow) as one in-place foreach lerp: the stock update
        allocates temporaries the size of the model every step (benchmarks/run.py, components)."""
        parameters = list(parameters)
        if any(not p.requires_grad or p.dtype != s.dtype for p, s in zip(parameters, self.shadow_params)):
            return super().step(parameters)  # frozen or reduced-precision parameters: the stock rule
        self.optimization_step += 1
        self.cur_decay_value = decay = self.get_decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, parameters, 1 - decay)


def make_ema(unet, decay: float, warmup: bool = False, inv_gamma: float = 1.0, power: float = 0.75) -> PlainEMA:
    """The every-step EMA: constant `decay` (--ema_rate, the original), or with `warmup` diffusers'
    rule 1 - (1 + step / inv_gamma) ** -power, capped at `decay`."""
    return PlainEMA(
        unet.parameters(),
        decay=decay,
        min_decay=0.0 if warmup else decay,
        use_ema_warmup=warmup,
        inv_gamma=inv_gamma,
        power=power,
        foreach=True,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )


@contextlib.contextmanager
def ema_weights(ema: EMAModel, model: torch.nn.Module):
    """`with ema_weights(ema, model):` the model holds the EMA weights, in eval mode; on leaving, its
    training weights and mode come back (also when the body raises)."""
    was_training = model.training
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        ema.restore(model.parameters())
