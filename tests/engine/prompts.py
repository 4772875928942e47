"""Eight short prompts of different kinds, for batches on the real model."""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "The theory of relativity says that",
    "import numpy as np\n\n# compute the mean of an array\n",
    "Water boils at",
    "My favourite recipe for pancakes starts with",
]
