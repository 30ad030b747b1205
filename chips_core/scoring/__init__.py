"""Stage 3, score: the CHIPS math (METHOD.md). `endpoint` (closed-form InfoNCE gradients), `batches`,
`sketch` (JL projections), `curvature`, `weights`, `exact`; `prepare` streams features once into a
scoring cache, and `ranking` turns a cache into a ranking in milliseconds. `params` (PrepareConfig,
RankParams, the presets and the method list: every scoring default, once) and `diagnostics` are torch-free."""
