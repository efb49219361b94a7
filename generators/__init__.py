"""Generator stage: diffusion/flow models on latents, their objectives, samplers and guidance."""
