"""Team curation: who is acting (`identity`), what their role lets them do (`roles`), and the record of
what everyone did (`audit`). Roles are stored in the workspace and checked here, in the library, so the
CLI, the library and the dashboard enforce the same rules."""
