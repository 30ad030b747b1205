"""How the heavy steps run: in this process (`pipeline`) or on a Ray cluster (`ray_featurize`,
`ray_prepare`); both write the same files."""
