"""The parity prompts: varied chat questions on which every fast path must give the
reference's greedy answers (used by the tests and by bench/quality.py)."""
from __future__ import annotations

PARITY_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning, my friend' into Spanish.",
    "List three prime numbers greater than 20.",
)

# Longer, open-ended answers: where small numeric differences show first.
OPEN_PROMPTS = (
    "Give me a short poem about the sea.",
    "What are the health benefits of drinking water?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
)
