"""The synthetic-sample core, shared by the teacher, the generators and their alignment (pure: no Ray, no HTTP).

- `prompts`: SPEED's prompts (brainstorm, data synthesis, judge, revision) and the fixed tasks;
- `schemas`: each task type's sample keys and JSON schema;
- `parsing`: model output -> a checked sample, or a reason it is rejected;
- `samples`: sample rows, their ids and lineage;
- `mixture`: the task-type mixture and its allocation.
"""
