"""The one E5 instruction format, shared by training, evaluation and serving (pure).

E5-mistral (https://arxiv.org/abs/2401.00368, Section 3.2) and SPEED (Section 3.3) put a task instruction before
each query: ``Instruct: {instruction}\\nQuery: {query}``; documents get none. The embedder's training triples,
the evaluator's query prefixes and the embeddings server's `instruction` field all format it here, so a model is
served and scored with the inputs it was trained on.
"""

from __future__ import annotations

E5_TEMPLATE = "Instruct: {instruction}\nQuery: "


def e5_prefix(instruction: str, template: str = E5_TEMPLATE) -> str:
    """The text put before a query for this instruction (what SentenceTransformer calls a prompt)."""
    return template.format(instruction=instruction.strip())


def with_instruction(instruction: str, text: str) -> str:
    """A query (or a symmetric task's text) with the instruction before it."""
    return e5_prefix(instruction) + text
