"""Vision encoders of the vision-language models: SigLIP (Idefics3 / SmolVLM) and CLIP (LLaVA)."""
