"""The trainer: diffusers, transformers and accelerate only; it knows nothing of InvokeAI."""
