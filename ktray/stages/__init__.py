"""The stages: one module each, a ``spec`` (params, inputs, compute) run by ``ktray.lifecycle.ensure``."""
