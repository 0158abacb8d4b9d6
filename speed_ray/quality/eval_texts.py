"""The texts of the evaluation tasks a run reports, per task: what decontamination checks synthetic rows against.

Local tasks (evaluate.local_tasks) are read from their files (`speed_ray.evaluate.local_tasks`); hub MTEB tasks
(evaluate.tasks / evaluate.benchmark) only when the hub is reachable: offline they are skipped, with the reason.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("speed_ray.quality")


def task_texts(data: dict[str, Any], task_type: str) -> list[str]:
    """The texts a local task's evaluation embeds (read_task's shape): STS / pair sentences, the classification
    test texts, the retrieval queries and corpus (title + text)."""
    if task_type in ("sts", "pair_classification"):
        return list(data["test"]["sentence1"]) + list(data["test"]["sentence2"])
    if task_type == "classification":
        return list(data["test"]["text"])
    return list(data["queries"].values()) + [f"{d.get('title', '')} {d['text']}".strip()
                                             for d in data["corpus"].values()]


def evaluation_texts(local_tasks: tuple[str, ...], data_root: str | None, hub_tasks: tuple[str, ...],
                     benchmark: str | None) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """({task name: texts}, [{"task", "reason"} for each task left out])."""
    from speed_ray.evaluate.local_tasks import load_spec, read_task
    from speed_ray.evaluate.run import find_task_yaml

    texts: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    for path in local_tasks:
        spec = load_spec(find_task_yaml(path), data_root)
        missing = spec.missing_files()
        if missing:
            skipped.append({"task": spec.name, "reason": f"data file not found: {missing[0]}"})
            continue
        texts[spec.name] = task_texts(read_task(spec), spec.type)
    hub = [*hub_tasks, *([f"benchmark:{benchmark}"] if benchmark else [])]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    for name in hub:
        reason = ("the hub is offline (HF_HUB_OFFLINE): its texts cannot be read" if offline else
                  "hub MTEB tasks are not read for decontamination yet: list its local copy in evaluate.local_tasks")
        skipped.append({"task": name, "reason": reason})
    for s in skipped:
        log.warning("decontamination skips evaluation task %s: %s", s["task"], s["reason"])
    return texts, skipped
