"""E5-mistral's per-task query instructions for MTEB (Wang et al. 2023, https://arxiv.org/abs/2401.00368).

The table is the one E5-mistral was evaluated with (microsoft/unilm e5/utils.py,
`get_task_def_by_task_name_and_type`), covering the 56 tasks of the classic English MTEB that SPEED reports.
"""

from __future__ import annotations

from speed_ray.e5 import E5_TEMPLATE, e5_prefix

# One instruction for every task of a type.
_BY_TYPE = {
    "STS": "Retrieve semantically similar text.",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
    "BitextMining": "Retrieve parallel sentences.",
}

_BY_TASK = {
    # Classification
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual or "
                                          "not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six "
                             "emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, "
                                              "or neutral",
    # Clustering
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # Reranking and pair classification
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    # Retrieval
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
}

_CQADUPSTACK = ("Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to "
                "the given question")


def e5_instruction(task_name: str, task_type: str | None = None) -> str | None:
    """E5-mistral's instruction for a task, or None when the table has none (the caller falls back)."""
    if task_type in _BY_TYPE:
        return _BY_TYPE[task_type]
    base = task_name.split(".v")[0] if ".v" in task_name else task_name   # "SciFact.v2" reads like "SciFact"
    if base.lower().startswith("cqadupstack"):
        return _CQADUPSTACK
    return _BY_TASK.get(base)


def task_instruction(task_name: str, task_type: str | None, task_prompt: str | dict | None = None) -> str:
    """The query instruction for a task: E5-mistral's table, else the task's own mteb prompt, else a generic one."""
    found = e5_instruction(task_name, task_type)
    if found:
        return found
    if isinstance(task_prompt, dict):
        task_prompt = task_prompt.get("query")
    if task_prompt:
        return task_prompt
    return "Given a query, retrieve relevant passages" if task_type in ("Retrieval", "Reranking") else \
        "Retrieve semantically similar text."


def query_prefix(instruction: str, template: str = E5_TEMPLATE) -> str:
    """The text put before each query: the template with the instruction filled in."""
    if "{instruction}" not in template:
        raise ValueError(f"instruction template {template!r} has no '{{instruction}}' placeholder")
    return e5_prefix(instruction, template)
