"""Known distributions with exact metrics: the ground truth of the toy benchmarks (``bench/toy*``).

``problems``: caption-conditioned Gaussian mixtures over a tiny "video" (the ``Problem``
interface any user distribution can implement) and the fixed family with its tuning/test split.
``metrics``: Fréchet distance to exact moments, Mahalanobis on-mode counts, mode occupancy.
"""
