"""The paper-reproduction kit: what the paper's experiments need beyond the plugin.

Imported on demand (``import qmm_plugin`` does not load it): the paper's networks
(:mod:`.models`), data (:mod:`.data`), metrics (:mod:`.metrics`), image grids (:mod:`.viz`), the
GAN baselines of Table 1 (:mod:`.gan_families`), Appendix C's EM for the Q-β-VAE (:mod:`.vae_em`)
and the examples' training machinery (:mod:`.training`).
"""
