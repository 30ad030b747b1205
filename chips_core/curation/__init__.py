"""Stage 4, curate: decisions and versioned selections (`selection`), CSV/webdataset exports (`export`),
UMAP maps (`maps`) and thumbnails (`gallery`)."""
