"""Images for vision models: checks and decoding (`images`), the model's preprocessing
(`processing`)."""
