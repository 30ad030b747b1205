"""Stage 5, train and measure: CPT through open_clip_train (`cpt`), retrieval and zero-shot evaluation
(`evaluate`), and the method comparison that runs both per cell (`experiment`)."""
