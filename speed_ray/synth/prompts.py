"""Prompts: E5-mistral's brainstorm/synthesis templates as SPEED adapts them (App. C.1), and SPEED's judge and
revise prompts (App. C.2). E5: https://arxiv.org/abs/2401.00368  SPEED: https://arxiv.org/abs/2410.18634

Every random slot is drawn from the caller's `random.Random` and returned in `prompt_params`, so a prompt is
reproducible from its seed and auditable from its row."""

from __future__ import annotations

import json
import random

SYSTEM = "You are a helpful assistant."

# E5 has no brainstormed tasks for these: their task is a fixed instruction (E5 Table 14/15); SPEED conditions
# STS on the topic at synthesis time instead (App. C.1).
FIXED_TASKS = {"sts": "Retrieve semantically similar text.", "bitext": "Retrieve parallel sentences."}

# Target languages for bitext (E5 draws from 93; this is a broad, common subset).
BITEXT_LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Russian", "Polish", "Czech",
                    "Turkish", "Arabic", "Hebrew", "Persian", "Hindi", "Bengali", "Urdu", "Chinese", "Japanese",
                    "Korean", "Vietnamese", "Thai", "Indonesian", "Swahili", "Greek", "Swedish", "Finnish",
                    "Hungarian", "Romanian", "Ukrainian", "Uzbek")

_RETRIEVAL_EXAMPLES = (
    "- Retrieve relevant documents for a short keyword web search query that asks for weather information.",
    "- Search for documents that answers a FAQ-style query on children's nutrition.",
    "- Provided a scientific claim as query, retrieve documents that help verify or refute the claim.",
    "- Given a debate topic as query, retrieve documents that is either supportive or against the topic.",
    "- The query is a multi-hop question on celebrities, retrieve documents that help answer the question.",
    "- The query is a natural language description of a function, find the correct code implementation.",
    "- Given a news article that user has read as the query, retrieve other articles that the user may be "
    "interested in.",
)
_CLASSIFY_EXAMPLES = (
    "- Classify the given TripAdvisor review into positive, negative, or neutral sentiment.",
    "- Determining if a message is a question, request, command, or statement.",
    "- Classify the given forum post into one of the categories: question, answer, or discussion.",
    "- Given an Amazon product review, find the main features mentioned.",
    "- Given a user comment on a news article, find the main argument presented.",
    "- Categorizing online articles into user-preferred reading difficulty levels.",
    "- Classify the given Yelp review as either helpful or not helpful.",
)


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def needs_brainstorm(task_type: str) -> bool:
    return task_type not in FIXED_TASKS


def brainstorm_messages(task_type: str, topic: str, n_tasks: int = 5, rng: random.Random | None = None) -> list[dict]:
    """E5's brainstorm prompt for a task type with SPEED's "for the topic: {topic}" (App. C.1).
    The in-context examples are shuffled with `rng` (E5 does, for diversity); None keeps their order."""
    if task_type in FIXED_TASKS:
        raise ValueError(f"task type {task_type!r} has no brainstormed tasks; its task is {FIXED_TASKS[task_type]!r}")
    tail = (f"Your output must always be a python list of strings only, with about {n_tasks} elements, and each "
            "element corresponds to a distinct {what} in one sentence. Do not explain yourself or output anything "
            "else. Be creative!")
    if task_type in ("retrieval", "classification"):
        examples = list(_RETRIEVAL_EXAMPLES if task_type == "retrieval" else _CLASSIFY_EXAMPLES)
        if rng is not None:
            rng.shuffle(examples)
        if task_type == "retrieval":
            head = f"Brainstorm a list of potentially useful text retrieval tasks for the topic: {topic}."
            guide = ("- Specify what the query is, and what the desired documents are.\n"
                     "- Each retrieval task should cover a wide range of queries, and should not be too specific.")
            what = "retrieval task"
        else:
            head = f"Brainstorm a list of potentially useful text classification tasks for the topic: {topic}."
            guide = ("- Tasks should cover a diverse range of domains and task types.\n"
                     "- Avoid generate tasks similar to classification of sentiment / subject / study field / genre "
                     "/ main topic / spam / urgency / language.")
            what = "text classification task"
        prompt = (f"{head}\n\nHere are a few examples for your reference:\n" + "\n".join(examples)
                  + f"\n\nPlease adhere to the following guidelines:\n{guide}\n\n" + tail.format(what=what))
    elif task_type == "matching_short":
        prompt = (f"Brainstorm a list of text matching tasks for the topic: {topic}, where both the queries and the "
                  "groundtruth documents are very short (one or two sentences, even a short phrase).\n\n"
                  "Here are a few examples:\n"
                  "- Given a scientific paper title, retrieve the title of papers that cite the given paper.\n"
                  "- Match a word with its definition.\n"
                  "- Provided a notable person's name, identify their occupation or achievement.\n\n"
                  + tail.format(what="task"))
    elif task_type == "matching_long":
        prompt = (f"Brainstorm a list of text matching tasks for the topic: {topic}, where the queries are long "
                  "documents.\n\nHere are a few examples:\n"
                  "- Given a document that supports a debatable argument, find another document that contains "
                  "opposite arguments.\n"
                  "- Provided a lengthy business proposal, retrieve competitive business strategies in the same "
                  "industry.\n\n" + tail.format(what="task"))
    else:
        raise ValueError(f"unknown task type {task_type!r}")
    return _chat(prompt)


def _retrieval(task: str, rng: random.Random, language: str) -> tuple[str, dict]:
    p = {"num_words": rng.choice([50, 100, 200, 300, 400, 500]),
         "difficulty": rng.choice(["high school", "college", "PhD"]),
         "query_length": rng.choices(["less than 5 words", "5 to 15 words", "at least 10 words"], [0.4, 0.4, 0.2])[0],
         "clarity": rng.choices(["clear", "understandable with some effort", "ambiguous"], [0.6, 0.2, 0.2])[0],
         "query_type": rng.choices(["extremely long-tail", "long-tail", "common"], [0.4, 0.5, 0.1])[0],
         "language": language}
    guides = [
        f'- The "user_query" should be {p["query_type"]}, {p["query_length"]}, {p["clarity"]}, and diverse in topic.',
        '- All documents must be created independent of the query. Avoid copying the query verbatim. It\u2019s '
        'acceptable if some parts of the "positive_document" are not topically related to the query.',
        f'- All documents should be at least {p["num_words"]} words long.',
        '- The "hard_negative_document" contains some useful information, but it should be less useful or '
        'comprehensive compared to the "positive_document".',
        f"- Both the query and documents should be in {language}.",
        "- Do not provide any explanation in any document on why it is relevant or not relevant to the query.",
    ]
    p["with_difficulty"] = rng.random() < 0.5
    if p["with_difficulty"]:
        guides.append(f'- Both the query and documents require {p["difficulty"]} level education to understand.')
    rng.shuffle(guides)
    # SPEED's copy of this template has a stray 'The "user_query" should be' line; E5's original does not.
    prompt = (f"You have been assigned a retrieval task: {task}\n"
              "Your mission is to write one text retrieval example for this task in JSON format. The JSON object "
              "must contain the following keys:\n"
              '- "user_query": a string, a random user search query specified by the retrieval task.\n'
              '- "positive_document": a string, a relevant document for the user query.\n'
              '- "hard_negative_document": a string, a hard negative document that only appears relevant to the '
              "query.\n\nPlease adhere to the following guidelines:\n" + "\n".join(guides)
              + "\n\nYour output must always be a JSON object only, do not explain yourself or output anything else. "
              "Be creative!")
    return prompt, p


def _classification(task: str, rng: random.Random, language: str) -> tuple[str, dict]:
    p = {"num_words": rng.choices(["less than 10", "at least 10", "at least 50", "at least 100", "at least 200"],
                                  [0.1, 0.3, 0.2, 0.2, 0.2])[0],
         "difficulty": rng.choice(["high school", "college", "PhD"]),
         "clarity": rng.choices(["clear", "understandable with some effort", "ambiguous"], [0.6, 0.2, 0.2])[0],
         "language": language}
    guides = [
        f'- The "input_text" should be {p["num_words"]} words and diverse in expression.',
        '- The "misleading_label" must be a valid label for the given task, but not as appropriate as the "label" '
        'for the "input_text".',
        f"- The values for all fields should be in {language}.",
        '- Avoid including the values of the "label" and "misleading_label" fields in the "input_text", that would '
        "make the task too easy.",
    ]
    p["with_difficulty"] = rng.random() < 0.5
    if p["with_difficulty"]:
        guides.append(f'- The "input_text" is {p["clarity"]} and requires {p["difficulty"]} level education to '
                      "comprehend.")
    rng.shuffle(guides)
    prompt = (f"You have been assigned a text classification task: {task}\n\n"
              "Your mission is to write one text classification example for this task in JSON format. The JSON "
              "object must contain the following keys:\n"
              '- "input_text": a string, the input text specified by the classification task.\n'
              '- "label": a string, the correct label of the input text.\n'
              '- "misleading_label": a string, an incorrect label that is related to the task.\n\n'
              "Please adhere to the following guidelines:\n" + "\n".join(guides)
              + "\n\nYour output must always be a JSON object only, do not explain yourself or output anything else. "
              "Be creative!")
    return prompt, p


def _matching(task: str, task_type: str, language: str) -> tuple[str, dict]:
    length = ("very short (a sentence or a phrase)" if task_type == "matching_short"
              else "long documents (at least 300 words)")
    p = {"length_requirement": length, "language": language}
    guides = [f"- The values of all fields should be in {language}.",
              f'- Both the "input" and "positive_document" should be {length}, avoid substantial word overlaps, '
              "otherwise the task would be too easy.",
              '- The "input" and "positive_document" should be independent of each other.']
    prompt = (f"You have been assigned a text matching task: {task}\n\n"
              "Your mission is to write one example for this task in JSON format. The JSON object must contain the "
              "following keys:\n"
              '- "input": a string, a random input specified by the task.\n'
              '- "positive_document": a string, a relevant document for the "input" according to the task.\n\n'
              "Please adhere to the following guidelines:\n" + "\n".join(guides)
              + "\n\nYour output must always be a JSON object only, do not explain yourself or output anything else. "
              "Be creative!")
    return prompt, p


def _sts(topic: str | None, rng: random.Random, language: str) -> tuple[str, dict]:
    p = {"high_score": rng.choice([4, 4.5, 5]), "low_score": rng.choice([2.5, 3, 3.5]),
         "unit": rng.choices(["sentence", "phrase", "passage"], [0.9, 0.05, 0.05])[0],
         "difficulty": rng.choice(["elementary school", "high school", "college"]), "language": language,
         "topic": topic}
    u = p["unit"]
    guides = [f'- The keys in JSON are "S1", "S2", and "S3", the values are all strings in {language}, do not add '
              "any other keys.",
              f"- There should be some word overlaps between all three {u}s.",
              f"- The similarity score between S1 and S2 should be {p['high_score']}.",
              f"- The similarity score between S1 and S3 should be {p['low_score']}."]
    p["with_difficulty"] = rng.random() < 0.5
    if p["with_difficulty"]:
        guides.append(f"- The {u}s require {p['difficulty']} level education to understand and should be diverse in "
                      "terms of topic and length.")
    where = f" for the topic: {topic}" if topic else ""
    prompt = (f"Write a {u} triple{where} with varying semantic similarity scores in JSON format. The semantic "
              "similarity score ranges from 1 to 5, with 1 denotes least similar and 5 denotes most similar.\n\n"
              "Please adhere to the following guidelines:\n" + "\n".join(guides)
              + '\n\nYour output must always be a JSON object only with three keys "S1", "S2" and "S3", do not '
              "explain yourself or output anything else. Be creative!")
    return prompt, p


def _bitext(topic: str | None, rng: random.Random, language: str) -> tuple[str, dict]:
    src, tgt = language, rng.choice([x for x in BITEXT_LANGUAGES if x != language])
    if rng.random() < 0.5:   # E5 draws both directions
        src, tgt = tgt, src
    p = {"src_lang": src, "tgt_lang": tgt, "high_score": rng.choice([4, 4.5, 5]),
         "low_score": rng.choice([1.5, 2, 2.5]),
         "unit": rng.choices(["sentence", "phrase", "passage"], [0.9, 0.05, 0.05])[0],
         "difficulty": rng.choice(["elementary school", "high school", "college"]), "topic": topic}
    u = p["unit"]
    where = f" for the topic: {topic}" if topic else ""   # SPEED's topic conditioning, as for STS
    prompt = (f"Write a {u} triple{where} with one {u} in {src} and two {u}s in {tgt} with varying translation "
              'qualities in JSON format.\n\nThe triple is denotes as ("S1", "S2", "S3"). The translation quality '
              "score ranges from 1 to 5, with higher scores are better.\n\nPlease adhere to the following "
              f'guidelines:\n- The values of "S1" is a string in {src}, the value of "S2" and "S3" are strings in '
              f'{tgt}.\n- There should be some word overlaps between "S2" and "S3".\n'
              f'- The translation quality score of "S2" with respect to "S1" should be {p["high_score"]}.\n'
              f'- The translation quality score of "S3" with respect to "S1" should be {p["low_score"]}\n'
              '- "S3" should be grammatical and fluent, but contain some keyword or number translation errors, or '
              "miss some information, or contain some redundant information.\n"
              f'- "S1" requires {p["difficulty"]} level education to understand and should be diverse in terms of '
              'topic and length.\n\nYour output must always be a JSON object only with three keys "S1", "S2" and '
              '"S3", do not explain yourself or output anything else. Be creative!')
    return prompt, p


def synthesis_messages(task_type: str, task: str, rng: random.Random, topic: str | None = None,
                       language: str = "English") -> tuple[list[dict], dict]:
    """The data-synthesis prompt for one sample and the random slots it drew (prompt_params).

    retrieval/classification/matching use E5's templates with the brainstormed `task`; STS (and bitext) are
    conditioned on `topic` instead (SPEED App. C.1)."""
    if task_type == "retrieval":
        prompt, p = _retrieval(task, rng, language)
    elif task_type == "classification":
        prompt, p = _classification(task, rng, language)
    elif task_type in ("matching_short", "matching_long"):
        prompt, p = _matching(task, task_type, language)
    elif task_type == "sts":
        prompt, p = _sts(topic, rng, language)
    elif task_type == "bitext":
        prompt, p = _bitext(topic, rng, language)
    else:
        raise ValueError(f"unknown task type {task_type!r}")
    return _chat(prompt), {"task_type": task_type, **p}


def data_prompt(prompt_messages: list[dict] | str) -> str:
    """The text of a data prompt (its user turn), as the judge and revise prompts quote it."""
    if isinstance(prompt_messages, str):
        prompt_messages = json.loads(prompt_messages)
    users = [m["content"] for m in prompt_messages if m.get("role") == "user"]
    if not users:
        raise ValueError("the data prompt has no user message")
    return users[-1]


def judge_messages(prompt_messages: list[dict] | str, outputs: list[str]) -> list[dict]:
    """SPEED App. C.2 "Generating Preference Data" (indices start from 0). The list is quoted as SPEED's code
    does (Python's list repr of the raw outputs)."""
    prompt = (f"A language model has been given a prompt: {data_prompt(prompt_messages)}\n\n"
              f"The output list of it is: {list(outputs)}\n\n"
              "Your mission is to judge which data this language model generate fits the prompt most and which fits "
              "worst, and explain your judgment.\n\n"
              "The JSON object you output must contain the following keys:\n"
              '- "reason": a string, the reason of your judgment.\n'
              '- "best": a number, the index of the generated data that fits prompt the most (indice start from 0).\n'
              '- "worst": a number, the index of the generated data that fits prompt the worst.\n\n'
              "Your output must always be a JSON object only, do not explain yourself or output anything else.")
    return _chat(prompt)


_REVISE_CRITERIA = (
    "Your task is to evaluate the generated output based on the following criteria:\n\n"
    "1. Relevance: Assess whether the output directly addresses the task described in the prompt.\n"
    "2. Completeness: Check if the output includes all necessary elements as specified in the prompt.\n"
    "3. Accuracy: Verify if the output is factually correct and adheres to the guidelines provided in the prompt.\n\n")


def revise_messages(prompt_messages: list[dict] | str, output: str) -> list[dict]:
    """SPEED App. C.2 "Generating Revise Data": the teacher returns {"reason", "revision"}."""
    prompt = (f"A language model has been given a prompt: {data_prompt(prompt_messages)}\n\n"
              f"The output generated by the model is: {output}\n\n" + _REVISE_CRITERIA
              + "For each criterion, provide a brief explanation supporting your evaluation. Then, provide a revised "
              "version of the output.\n\nYour response should be a valid JSON object containing the following "
              'keys:\n\n- "reason": A string providing the reason for your judgment.\n'
              '- "revision": A string with the revised version of the output based on your evaluation and the '
              "prompt.\n\nEnsure your output is always a valid JSON object, formatted as a JSON string. Do not "
              "include any additional explanations or information.")
    return _chat(prompt)


def revisor_messages(prompt_messages: list[dict] | str, output: str) -> list[dict]:
    """Input of the trained small revisor: the same evaluation, but its answer is the revised sample JSON only
    (the teacher's reason is dropped from the SFT target so the revisor spends its tokens on the data)."""
    prompt = (f"A language model has been given a prompt: {data_prompt(prompt_messages)}\n\n"
              f"The output generated by the model is: {output}\n\n" + _REVISE_CRITERIA
              + "Revise the output so that it meets all three criteria and every guideline of the prompt.\n\n"
              "Your output must always be the revised JSON object only, with the same keys the prompt asks for; do "
              "not explain yourself or output anything else.")
    return _chat(prompt)
