"""The study's settings: the models and their example scripts, the paper's Table 1 numbers, the
budget presets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TABLE1 = Path(__file__).resolve().parent
#: the study's command line (it also runs each run's evaluation as a subprocess)
SCRIPT = REPO / "benchmarks" / "reproduce_table1.py"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mnist"
DOCS = REPO / "docs"


#: model -> (training script, display name). Order = table order. The GANs train with the study's
#: own trainer (every baseline, Appendix B's settings); the VAEs with the example script.
MODELS: dict[str, tuple[Path, str]] = {
    "wgan": (TABLE1 / "train_gan.py", "WGAN"),
    "dmwgan": (TABLE1 / "train_gan.py", "DMWGAN-style"),
    "qwgan": (TABLE1 / "train_gan.py", "Q-WGAN"),
    "qwgan-l0": (TABLE1 / "train_gan.py", "Q-WGAN λ=0"),
    "bvae": (EXAMPLES / "mnist_qbvae.py", "β-VAE"),
    "qbvae": (EXAMPLES / "mnist_qbvae.py", "Q-β-VAE"),
    "qbvae-l0": (EXAMPLES / "mnist_qbvae.py", "Q-β-VAE λ=0"),
}


GAN_MODELS = ("wgan", "dmwgan", "qwgan", "qwgan-l0")

#: The GANs of a study with ``recipe="ours"``: each trains under the main example's recipe
#: (``examples/mnist_qwgan.py``'s preset ``ours``; its docstring lists it). The one-generator models
#: are that example with a flag; the DMWGAN-style bank has no bias banks, so it keeps the study's
#: trainer and gets the recipe's Adam β1. model -> (script, flags).
RECIPE_GANS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "wgan": (EXAMPLES / "mnist_qwgan.py", ("--num-biases", "1", "--info", "0")),
    "dmwgan": (TABLE1 / "train_gan.py", ("--model", "dmwgan", "--beta1", "0.5")),
    "qwgan": (EXAMPLES / "mnist_qwgan.py", ()),
    "qwgan-l0": (EXAMPLES / "mnist_qwgan.py", ("--lam", "0")),
}

#: The manifold-class report's scalars (``ManifoldClassReport.summary()``) a results row keeps from
#: its run's final report: NMI(manifold; class), purity, distinct majority classes, share of samples
#: classified with p > 0.9, the smallest class's share of all samples, within-manifold diversity.
MANIFOLD_CLASS_KEYS = ("nmi", "purity", "distinct_majorities", "confident", "min_class_share", "diversity")

#: Order in which a study trains the models of one seed (the central comparison first, so a
#: stopped study has it); tables keep the MODELS order.
PRIORITY = ("qwgan", "qwgan-l0", "wgan", "dmwgan", "qbvae", "qbvae-l0", "bvae")


#: The paper's Table 1, MNIST rows (mean ± std over 10 runs).
#: DMWGAN is the paper's DMWGAN (learned π); ours is the DMWGAN-style baseline with uniform π.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "wgan": {"fid": (10.13, 3.16), "slant": (1.62, 0.41), "width": (1.68, 0.49)},
    "dmwgan": {"fid": (5.41, 0.34), "slant": (1.08, 0.04), "width": (1.11, 0.06)},
    "qwgan": {"fid": (5.69, 0.89), "slant": (2.15, 0.17), "width": (2.93, 0.60)},
    "qwgan-l0": {"fid": (15.74, 10.00), "slant": (1.76, 0.35), "width": (2.75, 0.67)},
    "bvae": {"fid": (58.43, 0.23), "slant": (5.04, 1.19), "width": (5.63, 0.75)},
    "qbvae": {"fid": (41.74, 1.40), "slant": (5.93, 1.78), "width": (5.71, 1.06)},
    "qbvae-l0": {"fid": (40.74, 2.03), "slant": (5.18, 0.77), "width": (5.00, 0.77)},
}


@dataclass(frozen=True)
class Budget:
    """Everything that defines a study: training budget per family and evaluation sizes."""

    preset: str
    seeds: int
    gan_steps: int
    vae_steps: int
    batch_size: int
    fid_samples: int
    dis_images: int  # source images per transform (paper: 500)
    dis_strengths: int  # strengths per image (paper: 11)
    inversion_steps: int  # cap on Eq. 3 Adam steps per image (q.invert's plateau schedule stops earlier)
    grid_inversion_steps: int  # Eq. 3 steps for the Fig. 5/6 generalisation grids
    curve_points: int  # sample grids + exact tangential spread (a Gram eigendecomposition per layer) per run
    smoke: bool = False
    recipe: str = "paper"  # "paper": every GAN with Appendix B's settings; "ours": RECIPE_GANS (GANs only)

    def steps(self, model: str) -> int:
        return self.gan_steps if model in GAN_MODELS else self.vae_steps

    def eval_key(self) -> dict[str, int]:
        """The evaluation settings a stored result must match to be reused."""
        return {"fid_samples": self.fid_samples, "dis_images": self.dis_images,
                "dis_strengths": self.dis_strengths, "inversion_steps": self.inversion_steps}


PRESETS: dict[str, Budget] = {
    "full": Budget("full", seeds=3, gan_steps=1000, vae_steps=30, batch_size=64, fid_samples=10000,
                   dis_images=10, dis_strengths=11, inversion_steps=100, grid_inversion_steps=500, curve_points=20),
    "quick": Budget("quick", seeds=2, gan_steps=100, vae_steps=5, batch_size=32, fid_samples=2000,
                    dis_images=6, dis_strengths=7, inversion_steps=50, grid_inversion_steps=300, curve_points=5),
    "recipe": Budget("recipe", seeds=3, gan_steps=2400, vae_steps=30, batch_size=32, fid_samples=10000,
                     dis_images=10, dis_strengths=11, inversion_steps=100, grid_inversion_steps=500, curve_points=4,
                     recipe="ours"),
    "smoke": Budget("smoke", seeds=1, gan_steps=4, vae_steps=2, batch_size=20, fid_samples=200,
                    dis_images=2, dis_strengths=3, inversion_steps=3, grid_inversion_steps=3, curve_points=1,
                    smoke=True),
}
