"""The root of every error chips_core raises for a problem its user can fix.

`ChipsError` means "bad input or a missing step, with a message that says what to do": the CLI prints its
message on one line and exits 1, and the dashboard shows it as an error box. Anything else that escapes is
a bug (the CLI exits 2). Subclasses exist where a caller needs to tell errors apart (a pool that failed to
ingest, a cancelled CPT run...). Those that were ValueErrors before the root existed still are, so callers
that catch ValueError keep working."""


class ChipsError(Exception):
    """A user-facing error of CHIPS Studio (see the module docstring)."""
