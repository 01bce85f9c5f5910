"""
data.py: training data for CARPE (LLaVA-Instruct + ImageNet-style classification, 1:7 mix).
(work in progress: the prompt template first, since eval.py imports it)
"""
from carpe import SYSTEM_PROMPT

IMAGE_TAG = "<image>"


def vicuna_prompt(question: str, has_image: bool) -> str:
    """A one-turn vicuna_v1 prompt ending in "ASSISTANT:", for generation. The tokenizer adds <s>."""
    image = IMAGE_TAG + "\n" if has_image else ""
    return f"{SYSTEM_PROMPT} USER: {image}{question} ASSISTANT:"
