"""The baseline: a training step written the way diffusers' `train_unconditional.py` does it.

examples/unconditional_image_generation/train_unconditional.py (diffusers 0.3x-0.4x), reduced to
its per-step work on one process: images decoded from the dataset and transformed one by one with
torchvision's PIL transforms (`set_transform`, DataLoader with 0 workers), UNet2DModel in fp32,
`torch.optim.AdamW` with its defaults besides lr and weight decay (single-tensor on CPU),
gradient clipping at 1.0, the cosine LR schedule, and `EMAModel` with its defaults (warm-up,
per-tensor update). Only the channel conversion follows the model (the example forces RGB).
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torchvision import transforms


def per_item_transform(resolution: int, channels: int):
    """The example's `transform_images`: one PIL image at a time."""
    augmentations = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    mode = "L" if channels == 1 else "RGB"

    def transform_images(examples):
        return {"input": [augmentations(image.convert(mode)) for image in examples["image"]]}

    return transform_images


def per_item_loader(dataset, resolution: int, channels: int, batch_size: int, seed: int = 0):
    """A DataLoader over a `datasets.Dataset` with an Image column, transformed per item."""
    dataset = dataset.with_transform(per_item_transform(resolution, channels))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(seed)
    )


class NaiveStep:
    """One optimiser step per call, as the example's loop body does it."""

    def __init__(
        self,
        unet: UNet2DModel,
        dataset,
        resolution: int,
        batch_size: int,
        timesteps: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        device="cpu",
    ):
        self.unet, self.device = unet.to(device).train(), device
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
        self.lr_scheduler = get_scheduler(
            "cosine", optimizer=self.optimizer, num_warmup_steps=500, num_training_steps=10**6
        )
        self.ema = EMAModel(
            unet.parameters(),
            decay=0.9999,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=3 / 4,
            model_cls=UNet2DModel,
            model_config=unet.config,
        )
        self.ema.to(device)
        loader = per_item_loader(dataset, resolution, unet.config.in_channels, batch_size)
        self.batches = self._endless(loader)  # re-iterated every epoch: every image transformed every time

    @staticmethod
    def _endless(loader):
        while True:
            yield from loader

    def __call__(self) -> float:
        clean_images = next(self.batches)["input"].to(self.device)
        noise = torch.randn(clean_images.shape, device=self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=self.device
        ).long()
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
        model_output = self.unet(noisy_images, timesteps).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.unet.parameters())
        return loss.item()  # the example logs loss.detach().item() every step


class OriginalStep(NaiveStep):
    """One optimiser step as GenerativeZoo's DDPM trains (docs/original.md): the
    same per-item transforms, smooth-L1 loss on the noise, `torch.optim.AdamW` with its defaults besides
    lr and weight decay, the one-cycle LR stepped every batch, and the EMA updated parameter by parameter
    (`ema = rate * ema + (1 - rate) * p`). The UNet is the diffusers model that an original checkpoint
    converts to exactly (its module code is the original's only part not measured here)."""

    def __init__(
        self,
        unet: UNet2DModel,
        dataset,
        resolution: int,
        batch_size: int,
        timesteps: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        ema_rate: float = 0.999,
        device="cpu",
    ):
        super().__init__(unet, dataset, resolution, batch_size, timesteps, lr, weight_decay, device)
        self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=lr,
            total_steps=10**6,
            pct_start=0.1,
            anneal_strategy="cos",
            cycle_momentum=False,
            div_factor=lr / 1e-6,
            final_div_factor=1,
        )
        self.ema_rate = ema_rate
        self.ema_params = [p.detach().clone() for p in unet.parameters()]

    def __call__(self) -> float:
        clean_images = next(self.batches)["input"].to(self.device)
        noise = torch.randn_like(clean_images)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=self.device
        )
        loss = F.smooth_l1_loss(self.unet(self.noise_scheduler.add_noise(clean_images, noise, t), t).sample, noise)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        with torch.no_grad():
            for ema, p in zip(self.ema_params, self.unet.parameters()):
                ema.mul_(self.ema_rate).add_(p, alpha=1 - self.ema_rate)
        return loss.item()
