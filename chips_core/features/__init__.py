"""Stage 2, featurize: load an open_clip model (`models`), find its projection heads (`adapters`) and store
every pair's pre-projection features in resumable shards (`featurize`)."""
