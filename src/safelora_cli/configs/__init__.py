"""Presets for real (base, aligned) pairs, shipped inside the package as safelora_cli.configs."""
