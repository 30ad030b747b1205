"""Where state lives: the workspace folder and its DuckDB file (`store`), removing what a pool produced
(`remove`), and background jobs that run `chips` commands (`jobs`)."""
