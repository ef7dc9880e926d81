"""The shipped default model's world: synthetic coloured shapes (``dataset``), a checker of generated images against
their prompts (``checker``), the training script (``train``) and the quality measurement (``evaluate``)."""
