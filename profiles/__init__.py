"""Device profiles (TOML data files), loaded with importlib.resources."""
