"""The LLM judge: score instruction responses from 0 to 100 with a model served over Ollama's REST API.

The prompt, options (seed 123, temperature 0) and judge (llama3.1:8b) follow the reference evaluation
(Raschka, "Build a Large Language Model (From Scratch)", chapter 7), with what it leaves out: replies
that state no score in an accepted form are asked once more and then recorded as failed — never
dropped, never counted as 0 — the average comes with a seeded bootstrap interval, transient faults
are retried, prompts that the judge's context would cut are flagged, and every answer is cached per
entry so that a re-run asks nothing twice.

The package, one job a module: `client` (Ollama's REST API, with retries), `scores` (reading a score
from a reply), `cache` (the per-entry score cache), `statistics` (the bootstrap interval and the plot
tables) and `absolute` (the absolute judge: one response scored 0-100 on its own, and the stage's
orchestration). A pairwise judge belongs beside `absolute`, reusing the rest. Nothing is re-exported
here, so that importing one module stays light: import from the modules.
"""
