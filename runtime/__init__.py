"""EdgeMoE runtime: ggml binding, model forward pass, sampling and generation."""
