"""The cycle: the one loop focalloop runs, whether Celery workers, `focalloop up`'s in-process
runner or a simulation drive it.

    trigger   beat's trigger: enough new labels, a cron, the first run, or the budget's last
              labels -> snapshot (a new dataset version) -> start
    start     a pending cycle (one active per project), numbered, evaluation set topped up
    train     claim -> train on the version's training rows -> judge against the current model
              (evaluate, the gate) -> record the model -> plan reviews -> one chunk per shard
    score     claim a chunk -> score its items -> candidates and per-item scores in the store;
              the chunk that completes scoring says "select next"
    select    merge the chunks' candidates -> the decision core chooses the batch -> selected
    hand_off  the project's labeler takes the batch (labeling.registry) -> the cycle is done
    ingest    inbox events (webhooks, simulated answers) -> annotations, by their labeler
    recover   beat's janitor: expired leases and lost messages become steps again

Which stage follows which is declared once, in `flow.FOLLOWS`; `stages.run_step` runs a step
with its stage function and checks what it returns. The Celery tasks (`workers.tasks`) send the
returned steps as messages; `runner.drain` runs them in this process. Helpers: `decide` (the
decision core: budget allowance, evaluation picks, scoring and batch choice, pure), `budget`,
`data` (pool and version reads), `leases` (claims, fencing, failing), `seeds` (every random
choice from the project's seed and the cycle's number), `evaluate`, `review`, `tables`.

Every stage is safe to run twice: claims are conditional UPDATEs, completions are fenced by the
attempt that claimed the work, and the database, not the broker, says what has happened.
"""
