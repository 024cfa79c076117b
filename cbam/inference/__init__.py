"""Using a trained network: a checkpoint with the facts of its data (:mod:`cbam.inference.trained`), the
images of a prediction (:mod:`cbam.inference.images`), ``python -m cbam.predict``
(:mod:`cbam.inference.predict`) and ``python -m cbam.export`` (:mod:`cbam.inference.export`)."""
