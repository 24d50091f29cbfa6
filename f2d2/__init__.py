"""F2D2: few-step flow maps with an average-divergence head that sample and score in K network evaluations.

`flowmap` (model, sign convention of D), `losses` (method `f2d2`: Shortcut- and MeanFlow-F2D2),
`guidance` (maximum-likelihood self-guidance); the `flowdistill f2d2-eval` table is flowdistill.f2d2_eval.
The closed-form Gaussian references the tests hold F2D2 to live in `tests/gaussian_reference.py`.
"""
