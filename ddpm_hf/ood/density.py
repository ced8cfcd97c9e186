"""The density over a score's features: standardised features under a scikit-learn GaussianMixture whose
number of components and covariance type are chosen by held-out likelihood, fitted on in-distribution
training images only. Its fitted parameters are plain arrays (saved as safetensors, never pickled)."""

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from ..util.errors import UsageError

COMPONENTS = (1, 2, 4, 8)
COVARIANCES = ("full", "diag")
HELD_OUT = 0.25  # share of the training features that judges each candidate mixture
REG_COVAR = 1e-4  # on standardised features: keeps a near-constant feature from a singular covariance


def _mixture(n_components: int, covariance_type: str, seed: int):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(
        n_components=n_components, covariance_type=covariance_type, reg_covar=REG_COVAR, n_init=2, random_state=seed
    )


def _candidates(n_fit: int, dims: int, components: Sequence[int], covariances: Sequence[str]):
    """(k, covariance) pairs whose parameters the fitting images can support (at least 2 images each)."""
    for cov in covariances:
        for k in components:
            params = k * (dims + (dims * (dims + 1) // 2 if cov == "full" else dims))
            if k == 1 or (2 * k <= n_fit and params <= n_fit * dims):
                yield k, cov


def choose_mixture(features: np.ndarray, seed: int = 0, components=COMPONENTS, covariances=COVARIANCES) -> tuple:
    """(n_components, covariance_type) of the candidate with the best mean log-likelihood on a held-out
    quarter of `features` (standardised), each candidate fitted on the other three quarters."""
    order = np.random.RandomState(seed).permutation(len(features))
    n_held = max(1, int(round(len(features) * HELD_OUT)))
    held, fit = features[order[:n_held]], features[order[n_held:]]
    best, best_ll = (1, "full"), -np.inf
    for k, cov in _candidates(len(fit), features.shape[1], components, covariances):
        ll = _mixture(k, cov, seed).fit(fit).score(held)
        if ll > best_ll:
            best, best_ll = (k, cov), ll
    return best


@dataclass
class Density:
    """A fitted mixture over standardised features; `nll(features)` is the anomaly score (higher = rarer)."""

    mean: np.ndarray
    scale: np.ndarray
    mixture: object  # sklearn.mixture.GaussianMixture, fitted or rebuilt from arrays

    @classmethod
    def fit(cls, features: np.ndarray, seed: int = 0, **choices) -> "Density":
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) < 4:
            raise UsageError(
                f"a density needs at least 4 in-distribution training images, got {len(features)}; "
                f"raise --stats_samples"
            )
        mean, scale = features.mean(0), np.maximum(features.std(0), 1e-12)
        z = (features - mean) / scale
        k, cov = choose_mixture(z, seed, **choices)
        return cls(mean, scale, _mixture(k, cov, seed).fit(z))

    def nll(self, features: np.ndarray) -> np.ndarray:
        """-log density of the features themselves (the standardisation's Jacobian included)."""
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return -self.mixture.score_samples(z) + np.log(self.scale).sum()

    def describe(self) -> dict:
        return {"components": int(self.mixture.n_components), "covariance_type": self.mixture.covariance_type}

    def to_arrays(self, prefix: str = "") -> Dict[str, np.ndarray]:
        m = self.mixture
        arrays = {
            "mean": self.mean,
            "scale": self.scale,
            "weights": m.weights_,
            "means": m.means_,
            "covariances": m.covariances_,
            "precisions_cholesky": m.precisions_cholesky_,
        }
        return {prefix + k: np.asarray(v, np.float64) for k, v in arrays.items()}

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray], covariance_type: str, prefix: str = "") -> "Density":
        """The density `to_arrays` saved, with sklearn's mixture rebuilt from its fitted attributes."""
        a = {k[len(prefix) :]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith(prefix)}
        mixture = _mixture(len(a["weights"]), covariance_type, 0)
        mixture.weights_, mixture.means_, mixture.covariances_ = a["weights"], a["means"], a["covariances"]
        mixture.precisions_cholesky_ = a["precisions_cholesky"]
        mixture.converged_, mixture.n_features_in_ = True, a["means"].shape[1]
        return cls(a["mean"], a["scale"], mixture)
