"""Ready-to-run YAML recipes (`aha recipes` lists them). Each holds only overrides of rl.config's defaults."""
