"""Fleets: a migration plan's servers cloned and cut over by workers on many hosts.

Celery carries the tasks and Redis holds the queue, the results, each server's status and
the leases (one writer per output). Modules: `app` (the Celery application and its
settings), `tasks` (clone and cut-over steps), `lease`, `status` (what each server is
doing, read by `p2v status`), `controller` (submits a plan wave by wave and follows it),
`page` (the status web page), `estimate` (a plan's duration on paper).

Nothing here runs without `--broker`: `p2v run` without it stays in-process (p2v/job.py).
"""
