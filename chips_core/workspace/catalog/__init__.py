"""The query layer over the workspace: every read and write of its tables as a small typed function.

SQL lives here and in `store.py` (schema, connections) only. Functions take a `Workspace` (they open a
short-lived connection) or an open connection (they run inside the caller's transaction, e.g. ingest's
chunk commits, `chips rm`'s cascade, selection saves). Modules by table group: `pools` (pools, pairs,
rejects, a pool's dependents), `runs` (models, feature runs and shards, scoring caches, score runs),
`curation` (decisions, selections, exports), `training` (CPT runs, progress, eval results), `jobs` (jobs
and the `chips status` overview), `team` (members, audit log, the activity trail).
"""

from chips_core.workspace.catalog.curation import *  # noqa: F403
from chips_core.workspace.catalog.jobs import *  # noqa: F403
from chips_core.workspace.catalog.pools import *  # noqa: F403
from chips_core.workspace.catalog.runs import *  # noqa: F403
from chips_core.workspace.catalog.team import *  # noqa: F403
from chips_core.workspace.catalog.training import *  # noqa: F403
