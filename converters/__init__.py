"""EdgeMoE converters: write checkpoints in the formats other tools and EdgeMoE read."""
