"""Training data: the record format (``records``), a synthetic RGB-D world (``synthetic``) and TFDS glue."""
