"""``hydra/sweeper=arms``: a study's arms (sets of overrides that go together) crossed with its params."""
