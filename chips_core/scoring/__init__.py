"""Stage 3, score: the CHIPS math (METHOD.md). `endpoint` (closed-form InfoNCE gradients), `batches`,
`sketch` (JL projections), `curvature`, `weights`, `exact`; `prepare` streams features once into a
scoring cache, and `ranking` turns a cache into a ranking in milliseconds. `presets` and `diagnostics`
are torch-free."""
