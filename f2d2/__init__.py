"""F2D2: few-step flow maps with an average-divergence head that sample and score in K network evaluations.

`flowmap` (model, sign convention of D), `losses` (method `f2d2`: Shortcut- and MeanFlow-F2D2),
`guidance` (maximum-likelihood self-guidance), `report` (the `flowdistill f2d2-eval` table).
Closed-form Gaussian references live in `shared.gaussian`.
"""
