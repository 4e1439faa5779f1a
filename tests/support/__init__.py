"""Helpers the tests share: model and adapter builders, the fake Hub, the fork server, the float64 reference."""
