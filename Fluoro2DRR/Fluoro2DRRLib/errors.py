"""User-facing errors: one line naming the file (or input) and the problem."""


class InputError(Exception):
    """Bad user input. ``str(err)`` is a single line: ``<what>: <problem>``."""

    def __init__(self, what, problem: str):
        self.what = str(what)
        self.problem = problem
        super().__init__(f"{self.what}: {problem}")
