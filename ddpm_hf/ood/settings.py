"""What an OOD run or a detector needs to know, and nothing else: `OODSettings`, checked on creation
(the command builds it from its flags; the Python API takes it, or keywords, directly)."""

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from ..util.errors import UsageError


@dataclass
class OODSettings:
    score: str = "recon"
    recon_factors: List[float] = field(default_factory=lambda: [0.5])
    recon_zscore: bool = False  # each level's error z-scored under the training images (several levels: always)
    sample_timesteps: int = 300
    eta: float = 1.0  # DDIM eta of the reconstruction
    loss_type: str = "huber"
    lpips: bool = False
    recon_draws: int = 1
    nll_timesteps: Optional[int] = None
    path_steps: int = 10  # DDIM-inversion steps of the path score
    msma_levels: int = 10  # noise levels of the msma score
    patch_grid: int = 4  # the patch score pools its maps on patch_grid x patch_grid patches
    hidden_levels: List[float] = field(default_factory=lambda: [0.2])  # noise levels of the hidden score, of T
    hidden_grid: int = 2  # the hidden score pools each channel on hidden_grid x hidden_grid patches
    stats_samples: int = 256  # in-distribution training images that fit the score (never scored)
    batch_size: int = 128
    seed: int = 0
    mixed_precision: Optional[str] = None

    def __post_init__(self):
        self.recon_factors = [float(f) for f in self.recon_factors]
        self.hidden_levels = [float(f) for f in self.hidden_levels]
        if len(self.recon_factors) > 1:
            self.recon_zscore = True
        self.validate()

    def validate(self) -> None:
        from .scores import SCORES

        if self.score not in SCORES:
            raise UsageError(f"unknown --score {self.score}; choose one of {', '.join(SCORES)}")
        if not self.recon_factors or not all(0 < f <= 1 for f in self.recon_factors):
            raise UsageError(f"--recon_factors must all be in (0, 1], got {' '.join(map(str, self.recon_factors))}")
        positive = {
            "recon_draws": self.recon_draws,
            "path_steps": self.path_steps,
            "msma_levels": self.msma_levels,
            "patch_grid": self.patch_grid,
            "hidden_grid": self.hidden_grid,
            "batch_size": self.batch_size,
            "sample_timesteps": self.sample_timesteps,
        }
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"--{flag} must be a positive integer, got {value}")
        if not self.hidden_levels or not all(0 < f < 1 for f in self.hidden_levels):
            levels = " ".join(map(str, self.hidden_levels))
            raise UsageError(f"--hidden_levels must all be in (0, 1) (fractions of T), got {levels}")
        if self.stats_samples < 2:
            raise UsageError(
                f"--stats_samples must be at least 2 (a standard deviation needs two images), got {self.stats_samples}"
            )
        if self.loss_type not in ("huber", "l2", "l1"):
            raise UsageError(f"--loss_type must be huber, l2 or l1, got {self.loss_type}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "OODSettings":
        """Settings saved by `to_dict` (unknown keys are refused: they come from another version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown OOD settings {', '.join(unknown)} (saved by another version of ddpm-hf)")
        return cls(**values)
